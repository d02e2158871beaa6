//! `wisp`: the controller (`wisp serve`) and its client commands; all of it lives in `wisp::cli`.

fn main() {
    wisp::cli::main();
}
