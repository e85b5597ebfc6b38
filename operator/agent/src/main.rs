//! covi-agent: see `covi_agent::run`.

use std::process::ExitCode;

use covi_agent::config::Config;

#[tokio::main]
async fn main() -> ExitCode {
    covi_daemon::init_logging();
    let config = match Config::parse(std::env::args().skip(1), |k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match covi_agent::run::run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "covi-agent stopped");
            ExitCode::FAILURE
        }
    }
}
