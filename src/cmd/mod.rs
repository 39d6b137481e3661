//! One module per subcommand: its help text, `parse` (pure) and `run`.

pub mod append;
pub mod entries;
pub mod erase;
pub mod healthcheck;
pub mod inject;
pub mod libraries;
pub mod migrate;
pub mod prune;
pub mod rebuild;
pub mod replay_failed;
pub mod show;
pub mod status;
pub mod verify;
pub mod worker;

use lexopt::prelude::*;

use crate::config::Setting;
use crate::error::{AppError, Result};

/// The setting whose flag `arg` is, if any. Commands check this first in their loop,
/// so every setting flag works the same way:
/// `if let Some(s) = setting_flag(&arg, SETTINGS) { src.set_flag(s, string_value(p, s.flag)?); continue; }`
pub fn setting_flag(arg: &lexopt::Arg, settings: &[&'static Setting]) -> Option<&'static Setting> {
    match arg {
        Long(name) => settings.iter().copied().find(|s| s.flag == *name),
        _ => None,
    }
}

/// Reads a flag's value as UTF-8 text, naming the flag when it is not.
pub fn string_value(p: &mut lexopt::Parser, flag: &str) -> Result<String> {
    p.value()?.into_string().map_err(|_| AppError::usage(format!("invalid --{flag}: not valid UTF-8")))
}

/// Runs a command's `parse` on `args` as a unit test does: with a DATABASE_URL set and
/// nothing else in the environment.
#[cfg(test)]
pub fn parse_for_test<T>(
    parse: fn(&mut lexopt::Parser, &crate::config::Env) -> Result<Option<T>>,
    args: &[&str],
) -> Result<Option<T>> {
    let mut p = lexopt::Parser::from_args(args.iter().copied());
    parse(&mut p, &crate::config::Env::from_pairs([("DATABASE_URL", "postgres://u@localhost/db")]))
}
