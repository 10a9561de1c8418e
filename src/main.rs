//! `dbsync`: sync database tables between sites over permanent, token-authenticated connections.

mod cli;

use std::process::ExitCode;

use clap::Parser;

/// mimalloc instead of the system allocator: a pull allocates and frees a value per cell on both
/// sides, and glibc's malloc spent a quarter to a third of each agent's CPU time on it (perf, see
/// docs/performance.md); mimalloc's per-thread free lists do the same work in a fraction of it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_page_reclaim_on_free` (v3 `mimalloc.h`): whether a thread freeing into
/// a page another thread gave up may take that page over (default 0: only pages it allocated
/// from).
const MI_OPTION_PAGE_RECLAIM_ON_FREE: i32 = 35;

/// A pull allocates a batch's values on one thread and frees them on another (the freeing
/// thread, `pull::Freer`); with mimalloc's default such pages linger, given up by the thread
/// that filled them, and the peak RSS of the same pull moved more from run to run. Letting the
/// freeing thread take them over steadies it (docs/performance.md). mimalloc's own
/// `MIMALLOC_PAGE_RECLAIM_ON_FREE` still wins.
#[allow(unsafe_code)]
fn tune_allocator() {
    if std::env::var_os("MIMALLOC_PAGE_RECLAIM_ON_FREE").is_none() {
        // SAFETY: a plain option setter of the linked mimalloc with a valid option number (the
        // test below checks it against mimalloc's documented defaults), called before other
        // threads exist.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PAGE_RECLAIM_ON_FREE, 1) };
    }
}

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
    tune_allocator();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The option number is mimalloc's enum position, not exported by the bindings: it must
    /// name the option meant, which its neighbours' documented defaults confirm (read before
    /// this process sets anything: tests do not run `main`).
    #[test]
    #[allow(unsafe_code)]
    fn allocator_option_number() {
        // SAFETY: plain option getters of the linked mimalloc.
        let (generic_collect, reclaim_on_free, page_full_retain) = unsafe {
            (
                libmimalloc_sys::mi_option_get(MI_OPTION_PAGE_RECLAIM_ON_FREE - 1),
                libmimalloc_sys::mi_option_get(MI_OPTION_PAGE_RECLAIM_ON_FREE),
                libmimalloc_sys::mi_option_get(MI_OPTION_PAGE_RECLAIM_ON_FREE + 1),
            )
        };
        assert_eq!(
            generic_collect, 10_000,
            "mi_option_generic_collect precedes it"
        );
        assert_eq!(
            reclaim_on_free, 0,
            "mi_option_page_reclaim_on_free defaults to 0"
        );
        assert_eq!(page_full_retain, 2, "mi_option_page_full_retain follows it");
    }
}
