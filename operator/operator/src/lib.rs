//! covi-operator: schedules VirtualServers onto Hosts, manages addresses and
//! finalizers, and keeps Host and HostPool status current. One replica leads.

pub mod address;
pub mod config;
pub mod error;
pub mod health;
pub mod leader;
pub mod metrics;
pub mod migration;
pub mod readiness;
pub mod requests;
pub mod run;
pub mod scheduler;
pub mod view;
pub mod webhook;
