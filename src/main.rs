//! The `serve` binary: parse arguments, run the command, print errors as one line.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = loraplex::cli::Cli::parse();
    if let Some(n) = cli.threads() {
        // Before anything starts the pool: one pool of `n` threads for the whole process.
        std::env::set_var("RAYON_NUM_THREADS", n.max(1).to_string());
    }
    loraplex::init_threads();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(loraplex::cli::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
