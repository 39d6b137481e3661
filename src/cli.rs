//! The command line: `chronicle [--help|--version] <command> [flags]`.
//!
//! Parsing is pure (arguments and an environment snapshot in, a `Command` out), so it is
//! tested without a database; objects that do I/O are built afterwards, in `run`.

use std::ffi::OsString;

use lexopt::prelude::*;

use crate::cmd;
use crate::config::{self, Env};
use crate::error::{AppError, Kind, Result};
use crate::help::Help;
use crate::suggest;

/// What the user asked for.
#[derive(Debug)]
pub enum Command {
    /// Print this help on stdout, laid out for the terminal, and exit 0.
    Help(Help),
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

/// One subcommand: its name, a one-line summary and its full help (whose flag rows are
/// also the flags a typo is compared with).
pub struct CommandInfo {
    pub name: &'static str,
    pub summary: &'static str,
    pub help: fn() -> Help,
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

/// The top-level help: one screen (24 lines at 80 columns). Each command in one line; a
/// command's flags, variables, examples and the exit codes are in `chronicle help
/// <COMMAND>`.
pub fn main_help() -> Help {
    Help::new(format!(
        "{}: projects a notes application's events (chronicle_events) into its activity timeline \
         (chronicle_entries) through a transactional outbox.",
        version_text()
    ))
    .usage(&[
        "chronicle [-h | -V] [--log-format text|json] <COMMAND> [FLAGS]",
        "chronicle help <COMMAND>     its flags, variables, examples, exit codes",
    ])
    .heading("COMMANDS:")
    .rows(COMMANDS.iter().map(|c| (c.name, c.summary)))
    .text("The database is DATABASE_URL (or --database-url); a flag wins over its variable.")
}

/// A command's help, then what every command shares: the global flags, logging and the
/// exit codes.
pub fn command_help(c: &CommandInfo) -> Help {
    (c.help)()
        .flags_titled(
            "GLOBAL FLAGS (before the command):",
            &[&config::LOG_FORMAT],
            &[("-h, --help", "Print this help (chronicle --help: every command).".to_string())],
        )
        .text(
            "Flags win over environment variables. Logs go to stderr; RUST_LOG=debug shows more. Exit codes: \
             0 success, 1 failure, 2 usage or configuration error, 3 database unreachable or refusing us.",
        )
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
        _ => Err(flag_hint(arg.unexpected().into(), &["help", "version", "log-format"], "chronicle --help")),
    }
}

fn short_usage() -> String {
    let names: Vec<&str> = COMMANDS.iter().map(|c| c.name).collect();
    format!("usage: chronicle <COMMAND> [FLAGS]   (commands: {}; see chronicle --help)", names.join(", "))
}

/// An unknown command, with the nearest known one when there is one.
fn unknown_command(name: &str) -> AppError {
    let names: Vec<&str> = COMMANDS.iter().map(|c| c.name).collect();
    let hint = suggest::closest(name, &names).map(|c| format!(" (did you mean {c}?)")).unwrap_or_default();
    AppError::usage(format!("unknown command {name:?}{hint}\n{}", short_usage()))
}

/// A flag the command does not have (`--batchsize`): the nearest of its flags when one
/// is near, and where its flags are listed. Other errors pass unchanged.
fn suggest_flag(e: AppError, c: &CommandInfo) -> AppError {
    flag_hint(e, &(c.help)().long_flags(), &format!("chronicle help {}", c.name))
}

/// `e` with the nearest of `flags` (long flags, without `--`) when it is an unknown option,
/// and the help that lists them.
fn flag_hint(e: AppError, flags: &[&str], help: &str) -> AppError {
    let typed = match std::error::Error::source(&e).and_then(|s| s.downcast_ref::<lexopt::Error>()) {
        Some(lexopt::Error::UnexpectedOption(typed)) => typed.clone(),
        _ => return e,
    };
    let near = typed.strip_prefix("--").and_then(|t| suggest::closest(t, flags));
    let hint = near.map(|f| format!(" (did you mean --{f}?)")).unwrap_or_default();
    AppError::usage(format!("{e}{hint}; `{help}` lists its flags")).caused_by(e)
}

fn parse_command(name: &str, p: &mut lexopt::Parser, env: &Env) -> Result<Command> {
    if name == "help" {
        let topic = p.values().ok().and_then(|mut v| v.next());
        return match topic {
            None => Ok(Command::Help(main_help())),
            Some(t) => {
                let t = t.string()?;
                command_info(&t).map(|c| Command::Help(command_help(c))).ok_or_else(|| unknown_command(&t))
            }
        };
    }
    let Some(info) = command_info(name) else {
        return Err(unknown_command(name));
    };
    parse_known(name, p, env)
        .map(|parsed| parsed.unwrap_or_else(|| Command::Help(command_help(info))))
        .map_err(|e| suggest_flag(e, info))
}

/// The command's own parse: `None` when it was asked for its help.
fn parse_known(name: &str, p: &mut lexopt::Parser, env: &Env) -> Result<Option<Command>> {
    Ok(match name {
        "migrate" => cmd::migrate::parse(p, env)?.map(Command::Migrate),
        "append" => cmd::append::parse(p, env)?.map(Command::Append),
        "inject" => cmd::inject::parse(p, env)?.map(Command::Inject),
        "worker" => cmd::worker::parse(p, env)?.map(Command::Worker),
        "entries" => cmd::entries::parse(p, env)?.map(Command::Entries),
        "verify" => cmd::verify::parse(p, env)?.map(Command::Verify),
        "rebuild" => cmd::rebuild::parse(p, env)?.map(Command::Rebuild),
        "healthcheck" => cmd::healthcheck::parse(p, env)?.map(Command::Healthcheck),
        "replay-failed" => cmd::replay_failed::parse(p, env)?.map(Command::ReplayFailed),
        "status" => cmd::status::parse(p, env)?.map(Command::Status),
        "show" => cmd::show::parse(p, env)?.map(Command::Show),
        "prune" => cmd::prune::parse(p, env)?.map(Command::Prune),
        "erase" => cmd::erase::parse(p, env)?.map(Command::Erase),
        "libraries" => cmd::libraries::parse(p, env)?.map(Command::Libraries),
        other => return Err(unknown_command(other)),
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
        Command::Help(help) => {
            print!("{}", help.render_for_terminal());
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
    use crate::terminal::columns;

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
    fn main_help_lists_every_command_on_one_screen() {
        let h = main_help().render(80);
        for c in COMMANDS {
            assert!(h.contains(c.name));
        }
        assert!(h.contains("DATABASE_URL"));
        assert!(h.lines().count() <= 24, "{} lines:\n{h}", h.lines().count());
    }

    #[test]
    fn every_help_fits_80_columns() {
        let helps = std::iter::once(("chronicle".to_string(), main_help()))
            .chain(COMMANDS.iter().map(|c| (c.name.to_string(), command_help(c))));
        for (name, help) in helps {
            let text = help.render(80);
            for l in text.lines() {
                assert!(columns(l) <= 80, "{name}: {} columns: {l:?}", columns(l));
            }
        }
    }

    #[test]
    fn at_any_width_only_examples_and_usage_lines_may_be_wider() {
        for c in COMMANDS {
            let help = command_help(c);
            let verbatim = help.verbatim_lines();
            for width in [40, 50, 60, 100] {
                let text = help.render(width);
                for l in text.lines().filter(|l| columns(l) > width) {
                    assert!(verbatim.iter().any(|v| v == l), "{} at {width}: {l:?}", c.name);
                }
            }
        }
    }

    #[test]
    fn every_command_help_keeps_its_variables_and_defaults() {
        for c in COMMANDS {
            let flat = command_help(c).render(80).split_whitespace().collect::<Vec<_>>().join(" ");
            assert!(flat.contains("[DATABASE_URL; required]") || c.name == "healthcheck", "{}", c.name);
            assert!(flat.contains("[CHRONICLE_LOG_FORMAT; default text]"), "{}", c.name);
        }
        let worker = command_help(command_info("worker").unwrap()).render(80);
        let flat = worker.split_whitespace().collect::<Vec<_>>().join(" ");
        for s in config::WORKER_SETTINGS {
            let default = s.default.map(|d| format!("default {d}]")).unwrap_or_default();
            assert!(flat.contains(&format!("--{} {}", s.flag, s.metavar())), "--{}", s.flag);
            assert!(flat.contains(&format!("[{}; {default}", s.var)), "{}", s.var);
        }
    }

    fn usage_message(args: &[&str]) -> String {
        match parse(args) {
            Err(e) => {
                assert_eq!(exit_code(&e), 2, "{args:?}");
                e.to_string()
            }
            Ok(c) => panic!("{args:?} parsed as {c:?}"),
        }
    }

    #[test]
    fn a_mistyped_flag_or_command_gets_the_nearest() {
        let cases: [(&[&str], &str); 6] = [
            (&["worker", "--batchsize", "10"], "invalid option '--batchsize' (did you mean --batch-size?)"),
            (&["worker", "--batch_size=10"], "invalid option '--batch_size' (did you mean --batch-size?)"),
            (&["libraries", "--limt", "5"], "invalid option '--limt' (did you mean --limit?)"),
            (&["rebuild", "--emit-outbx"], "(did you mean --emit-outbox?)"),
            (&["status", "--jsn"], "(did you mean --json?)"),
            (&["workr"], "unknown command \"workr\" (did you mean worker?)"),
        ];
        for (args, expected) in cases {
            let m = usage_message(args);
            assert!(m.contains(expected), "{args:?}: {m}");
        }
        let m = usage_message(&["worker", "--batchsize", "10"]);
        assert!(m.ends_with("; `chronicle help worker` lists its flags"), "{m}");
        let m = usage_message(&["worker", "--frobnicate"]);
        assert_eq!(m, "invalid option '--frobnicate'; `chronicle help worker` lists its flags");
        let m = usage_message(&["--lgo-format", "json", "status"]);
        assert_eq!(m, "invalid option '--lgo-format' (did you mean --log-format?); `chronicle --help` lists its flags");
        let m = usage_message(&["help", "wrker"]);
        assert!(m.contains("(did you mean worker?)"), "{m}");
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
