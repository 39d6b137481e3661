//! The command line: `chronicle [--help|--version] <command> [flags]`.
//!
//! Parsing is pure (arguments and an environment snapshot in, a `Command` out), so it is
//! tested without a database; objects that do I/O are built afterwards, in `run`.

use std::ffi::OsString;

use lexopt::prelude::*;

use crate::cmd;
use crate::config::Env;
use crate::error::{AppError, Kind, Result};

/// What the user asked for.
#[derive(Debug)]
pub enum Command {
    /// Print this text on stdout and exit 0.
    Help(String),
    Version,
    Migrate(cmd::migrate::Args),
    Append(cmd::append::Args),
    Inject(cmd::inject::Args),
    Worker(cmd::worker::Args),
    Entries(cmd::entries::Args),
    Verify(cmd::verify::Args),
    Rebuild(cmd::rebuild::Args),
    Healthcheck(cmd::healthcheck::Args),
    ReplayFailed(cmd::replay_failed::Args),
    Status(cmd::status::Args),
    Show(cmd::show::Args),
    Prune(cmd::prune::Args),
    Erase(cmd::erase::Args),
    Libraries(cmd::libraries::Args),
}

/// One subcommand: its name, a one-line summary and its full help.
pub struct CommandInfo {
    pub name: &'static str,
    pub summary: &'static str,
    pub help: fn() -> String,
}

pub const COMMANDS: &[CommandInfo] = &[
    CommandInfo { name: "migrate", summary: cmd::migrate::SUMMARY, help: cmd::migrate::help },
    CommandInfo { name: "append", summary: cmd::append::SUMMARY, help: cmd::append::help },
    CommandInfo { name: "inject", summary: cmd::inject::SUMMARY, help: cmd::inject::help },
    CommandInfo { name: "worker", summary: cmd::worker::SUMMARY, help: cmd::worker::help },
    CommandInfo { name: "libraries", summary: cmd::libraries::SUMMARY, help: cmd::libraries::help },
    CommandInfo { name: "entries", summary: cmd::entries::SUMMARY, help: cmd::entries::help },
    CommandInfo { name: "verify", summary: cmd::verify::SUMMARY, help: cmd::verify::help },
    CommandInfo { name: "rebuild", summary: cmd::rebuild::SUMMARY, help: cmd::rebuild::help },
    CommandInfo { name: "healthcheck", summary: cmd::healthcheck::SUMMARY, help: cmd::healthcheck::help },
    CommandInfo { name: "replay-failed", summary: cmd::replay_failed::SUMMARY, help: cmd::replay_failed::help },
    CommandInfo { name: "status", summary: cmd::status::SUMMARY, help: cmd::status::help },
    CommandInfo { name: "show", summary: cmd::show::SUMMARY, help: cmd::show::help },
    CommandInfo { name: "prune", summary: cmd::prune::SUMMARY, help: cmd::prune::help },
    CommandInfo { name: "erase", summary: cmd::erase::SUMMARY, help: cmd::erase::help },
];

pub fn version_text() -> String {
    format!("chronicle {}", env!("CARGO_PKG_VERSION"))
}

/// The top-level help: one screen. Each command in one line; a command's flags, variables
/// and examples are in `chronicle help <COMMAND>`.
pub fn main_help() -> String {
    let mut s = format!(
        "{}: keeps a notes application's activity timeline (chronicle_entries) projected\n\
         from its events (chronicle_events) through a transactional outbox.\n\n\
         USAGE:\n    chronicle [GLOBAL FLAGS] <COMMAND> [FLAGS]\n    chronicle help <COMMAND>\n\n\
         COMMANDS:\n",
        version_text()
    );
    for c in COMMANDS {
        s.push_str(&format!("    {:<14} {}\n", c.name, c.summary));
    }
    s.push_str(
        "\nGLOBAL FLAGS:\n    -h, --help           Print this help\n    -V, --version        Print the version\n    \
         --log-format WORD    text (default), or json: one object per line [CHRONICLE_LOG_FORMAT]\n\n\
         The database is DATABASE_URL (or --database-url). Flags win over environment variables.\n\
         Logs go to stderr; RUST_LOG=debug shows more.\n\
         Exit codes: 0 success, 1 failure, 2 usage or configuration error,\n            \
         3 database unreachable or refusing us.\n\n\
         Run `chronicle help <COMMAND>` for its flags, variables and examples (`chronicle help worker`).\n",
    );
    s
}

fn command_info(name: &str) -> Option<&'static CommandInfo> {
    COMMANDS.iter().find(|c| c.name == name)
}

/// Parses the process arguments (without the program name).
pub fn parse_from<I>(args: I, env: &Env) -> Result<Command>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    let mut p = lexopt::Parser::from_args(args);
    let mut arg = p.next()?;
    // Read by logging before parsing (see logging::format_from); validated there.
    while matches!(arg, Some(Long("log-format"))) {
        p.value()?;
        arg = p.next()?;
    }
    let Some(arg) = arg else {
        return Err(AppError::usage(format!("no command given\n\n{}", short_usage())));
    };
    match arg {
        Short('h') | Long("help") => Ok(Command::Help(main_help())),
        Short('V') | Long("version") => Ok(Command::Version),
        Value(v) => {
            let name = v.string()?;
            parse_command(&name, &mut p, env)
        }
        _ => Err(arg.unexpected().into()),
    }
}

fn short_usage() -> String {
    let names: Vec<&str> = COMMANDS.iter().map(|c| c.name).collect();
    format!("usage: chronicle <COMMAND> [FLAGS]   (commands: {}; see chronicle --help)", names.join(", "))
}

fn parse_command(name: &str, p: &mut lexopt::Parser, env: &Env) -> Result<Command> {
    let wrap = |info: &str, parsed: Option<Command>| -> Command {
        parsed.unwrap_or_else(|| Command::Help(command_info(info).map(|c| (c.help)()).unwrap_or_default()))
    };
    Ok(match name {
        "help" => {
            let topic = p.values().ok().and_then(|mut v| v.next());
            match topic {
                None => Command::Help(main_help()),
                Some(t) => {
                    let t = t.string()?;
                    match command_info(&t) {
                        Some(c) => Command::Help((c.help)()),
                        None => return Err(AppError::usage(format!("unknown command {t:?}\n{}", short_usage()))),
                    }
                }
            }
        }
        "migrate" => wrap(name, cmd::migrate::parse(p, env)?.map(Command::Migrate)),
        "append" => wrap(name, cmd::append::parse(p, env)?.map(Command::Append)),
        "inject" => wrap(name, cmd::inject::parse(p, env)?.map(Command::Inject)),
        "worker" => wrap(name, cmd::worker::parse(p, env)?.map(Command::Worker)),
        "entries" => wrap(name, cmd::entries::parse(p, env)?.map(Command::Entries)),
        "verify" => wrap(name, cmd::verify::parse(p, env)?.map(Command::Verify)),
        "rebuild" => wrap(name, cmd::rebuild::parse(p, env)?.map(Command::Rebuild)),
        "healthcheck" => wrap(name, cmd::healthcheck::parse(p, env)?.map(Command::Healthcheck)),
        "replay-failed" => wrap(name, cmd::replay_failed::parse(p, env)?.map(Command::ReplayFailed)),
        "status" => wrap(name, cmd::status::parse(p, env)?.map(Command::Status)),
        "show" => wrap(name, cmd::show::parse(p, env)?.map(Command::Show)),
        "prune" => wrap(name, cmd::prune::parse(p, env)?.map(Command::Prune)),
        "erase" => wrap(name, cmd::erase::parse(p, env)?.map(Command::Erase)),
        "libraries" => wrap(name, cmd::libraries::parse(p, env)?.map(Command::Libraries)),
        other => return Err(AppError::usage(format!("unknown command {other:?}\n{}", short_usage()))),
    })
}

/// The exit code of a failure (docs/DESIGN.md §4): 2 usage or configuration, 3 the
/// database unreachable or refusing us, 70 a worker thread panicked (a bug in chronicle;
/// sysexits' EX_SOFTWARE), 1 anything else. Decided here, at the boundary.
pub fn exit_code(e: &AppError) -> u8 {
    match e.kind() {
        Kind::Usage => 2,
        Kind::Unreachable => 3,
        Kind::Failed => 1,
        Kind::Panicked => 70,
    }
}

/// Runs a parsed command.
pub fn run(command: Command) -> Result<()> {
    match command {
        Command::Help(text) => {
            print!("{text}");
            Ok(())
        }
        Command::Version => {
            println!("{}", version_text());
            Ok(())
        }
        Command::Migrate(a) => cmd::migrate::run(a),
        Command::Append(a) => cmd::append::run(a),
        Command::Inject(a) => cmd::inject::run(a),
        Command::Worker(a) => cmd::worker::run(a),
        Command::Entries(a) => cmd::entries::run(a),
        Command::Verify(a) => cmd::verify::run(a),
        Command::Rebuild(a) => cmd::rebuild::run(a),
        Command::Healthcheck(a) => cmd::healthcheck::run(a),
        Command::ReplayFailed(a) => cmd::replay_failed::run(a),
        Command::Status(a) => cmd::status::run(a),
        Command::Show(a) => cmd::show::run(a),
        Command::Prune(a) => cmd::prune::run(a),
        Command::Erase(a) => cmd::erase::run(a),
        Command::Libraries(a) => cmd::libraries::run(a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Command> {
        parse_from(args.iter().copied(), &Env::from_pairs([]))
    }

    #[test]
    fn help_and_version() {
        assert!(matches!(parse(&["--help"]), Ok(Command::Help(_))));
        assert!(matches!(parse(&["-V"]), Ok(Command::Version)));
        for c in COMMANDS {
            assert!(matches!(parse(&[c.name, "--help"]), Ok(Command::Help(_))), "{}", c.name);
            assert!(matches!(parse(&["help", c.name]), Ok(Command::Help(_))), "{}", c.name);
        }
    }

    #[test]
    fn main_help_lists_every_command_and_worker_variable() {
        let h = main_help();
        for c in COMMANDS {
            assert!(h.contains(c.name));
        }
        assert!(h.contains("DATABASE_URL"));
    }

    #[test]
    fn unknown_things_are_usage_errors() {
        for args in [&[][..], &["frobnicate"], &["--frob"], &["help", "frob"], &["migrate", "--frob"]] {
            match parse(args) {
                Err(e) => assert_eq!(exit_code(&e), 2, "{args:?}"),
                Ok(c) => panic!("{args:?} parsed as {c:?}"),
            }
        }
    }
}
