//! `dbsync`: sync database tables between sites over permanent, token-authenticated connections.

mod cli;

use std::process::ExitCode;

use clap::Parser;

/// mimalloc instead of the system allocator: a pull allocates and frees a value per cell on both
/// sides, and glibc's malloc spent a quarter to a third of each agent's CPU time on it (perf, see
/// docs/performance.md); mimalloc's per-thread free lists do the same work in a fraction of it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Dies quietly on a closed pipe (`dbsync transfers list | head`) like other command-line tools,
/// instead of panicking on the failed write.
#[cfg(unix)]
#[allow(unsafe_code)]
fn restore_sigpipe() {
    // SAFETY: called first in main, before any other thread exists; SIG_DFL is a valid handler.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    #[cfg(unix)]
    restore_sigpipe();
    let args = cli::Cli::parse();
    cli::init_tracing(&args.global);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let json = args.global.json;
    match runtime.block_on(cli::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            cli::output::print_error(&err, json);
            ExitCode::FAILURE
        }
    }
}
