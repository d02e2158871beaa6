//! `wisp`: the controller (`wisp serve`) and its client commands.

fn main() {
    wisp::controller::cli::main();
}
