//! covi-agent: see `covi_agent::run`.

use std::process::ExitCode;

use covi_agent::config::Config;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse(std::env::args().skip(1), |k| std::env::var(k).ok());
    covi_daemon::run_main("covi-agent", config, covi_agent::run::main).await
}
