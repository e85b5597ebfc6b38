//! covi-operator: schedules VirtualServers onto Hosts, manages addresses and
//! finalizers, fulfils VmRequests, and keeps Host and HostPool status current. One
//! replica leads.
//!
//! Deciding is apart from writing: the pure rooms ([`scheduler`], [`migration`],
//! [`requests`], [`health`], [`readiness`], [`desired`]) take objects and return
//! decisions and typed status; [`writer`] is the only code that writes; [`run`],
//! [`pass`] and [`request_controller`] read the caches and connect the two.

pub mod address;
pub mod config;
pub mod console;
pub mod consolidation;
pub mod desired;
pub mod error;
#[cfg(test)]
pub mod fixtures;
pub mod health;
pub mod history;
pub mod leader;
pub mod metrics;
pub mod migration;
pub mod pass;
pub mod readiness;
pub mod request_controller;
pub mod requests;
pub mod run;
pub mod scheduler;
pub mod view;
pub mod webhook;
pub mod writer;
