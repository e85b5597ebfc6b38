//! covi-agent: see `covi_agent::run`.

use std::process::ExitCode;

use covi_agent::config::Config;

fn main() -> ExitCode {
    let config = Config::parse(std::env::args().skip(1), |k| std::env::var(k).ok());
    // One host's agent does little at once. Tokio's defaults (a worker per core, up to
    // 512 threads for blocking libvirt calls) would give it a hundred threads and their
    // memory on a large hypervisor; a fleet of simulated hosts keeps the defaults.
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if matches!(&config, Ok(c) if c.fleet.is_none()) {
        runtime.worker_threads(2).max_blocking_threads(16);
    }
    let runtime = runtime.enable_all().build().expect("the async runtime starts");
    let code = runtime.block_on(covi_daemon::run_main("covi-agent", config, covi_agent::run::main));
    // A libvirt call still under way on a blocking thread (a reconcile abandoned at
    // stop, libvirtd hung) must not keep the process from exiting.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}
