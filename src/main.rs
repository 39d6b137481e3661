//! `chronicle`: turns the result of a command into an exit code, nothing more.

use std::process::ExitCode;

use chronicle::{cli, config::Env, failpoint, logging, terminal};

fn main() -> ExitCode {
    // Fail points read FAILPOINTS (builds with the `failpoints` feature only: the tests').
    let _failpoints = failpoint::setup();
    let env = Env::from_process();
    let args: Vec<String> = std::env::args_os().skip(1).map(|a| a.to_string_lossy().into_owned()).collect();
    let result = logging::format_from(&env, &args).and_then(|format| {
        logging::init(&env, &format);
        cli::parse_from(std::env::args_os().skip(1), &env).and_then(cli::run)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chronicle: error: {}", terminal::printable_lines(&e.to_string()));
            ExitCode::from(cli::exit_code(&e))
        }
    }
}
