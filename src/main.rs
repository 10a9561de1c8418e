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

/// mimalloc's `purge_delay` option (its index in `mi_option_t` of the mimalloc 3 that
/// libmimalloc-sys builds; the sys crate names no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Milliseconds freed memory stays mapped before it is returned to the system: none.
/// mimalloc's default is a second, and an agent frees megabytes per batch (a pull a decoded
/// batch of ~3-4 MiB, a sender its page, the rows it read and the frame), much of it on
/// another thread than the one that allocated it, so the peak RSS held whatever was freed in
/// the last second and moved by a fifth from run to run: pull 36-46 MiB and sender 60-77 MiB
/// at 1M rows of the bench's table, with peaks at 4M rows up to 25 % above. Returned at once,
/// the peaks follow what is held: pull 31-34 MiB, sender 48 MiB. The cost is the page faults
/// of memory touched again: ~0.06 s more system time per million rows in a pull and ~15-20 %
/// more CPU in a sender (docs/performance.md). MIMALLOC_PURGE_DELAY still wins (1000 is
/// mimalloc's default).
const PURGE_DELAY_MS: std::ffi::c_long = 0;

/// Sets the purge delay unless the environment chose one. (mimalloc reads every option from
/// the environment when the process starts, so `mi_option_set_default` would come too late.
/// Set here, 10 ms still peaked at 39-42 MiB in a pull, like the default, where
/// MIMALLOC_PURGE_DELAY=10 gave 30-35 MiB; 0, which purges as memory is freed, behaves the same
/// either way.)
#[allow(unsafe_code)]
fn set_purge_delay(milliseconds: std::ffi::c_long) {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: mi_option_set only stores an option's value, which mimalloc reads when it next
    // purges; the index is checked against mimalloc's own default by a test.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, milliseconds) }
}

fn main() -> ExitCode {
    #[cfg(unix)]
    restore_sigpipe();
    let args = cli::Cli::parse();
    set_purge_delay(PURGE_DELAY_MS);
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
        // The report said it already.
        Err(err) if err.is::<cli::Differs>() => ExitCode::FAILURE,
        Err(err) => {
            cli::output::print_error(&err, json);
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    /// The option index names mimalloc's purge delay: its default is 1000 ms, which no option
    /// near it shares.
    #[test]
    #[allow(unsafe_code)]
    fn the_purge_delay_option_is_the_one_set() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        // SAFETY: reading an option has no preconditions.
        let value = unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        assert_eq!(value, 1000);
    }
}
