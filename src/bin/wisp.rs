//! `wisp`: the controller (`wisp serve`) and its client commands; all of it lives in `wisp::cli`.

/// On musl (the static release binaries), dlmalloc instead of musl's own malloc, as in the agent:
/// musl unmaps a freed page group at once, and the controller's buffers come and go per request
/// and per log chunk.
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOC: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

fn main() {
    wisp::cli::main();
}
