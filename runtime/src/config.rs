//! Flags, environment and a TOML file, in that order of precedence, for any clap parser:
//! each top-level key of the file is a long flag's name (`mqtt_addr` or `mqtt-addr`),
//! used only when that flag was given neither on the command line nor in the environment.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::Parser;
use clap::parser::ValueSource;

/// Parses the process's arguments; `config_flag` names the flag (by id) that points at
/// the TOML file. Exits with clap's message on bad flags, like `Parser::parse`.
pub fn parse_with_file<A: Parser>(config_flag: &str) -> Result<A, String> {
    parse_from_with_file(std::env::args_os().collect(), config_flag)
}

pub fn parse_from_with_file<A: Parser>(
    argv: Vec<OsString>,
    config_flag: &str,
) -> Result<A, String> {
    let command = A::command();
    let matches = command.clone().get_matches_from(argv.clone());
    let Some(path) = matches.get_one::<PathBuf>(config_flag).cloned() else {
        return A::from_arg_matches(&matches).map_err(|e| e.to_string());
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read the config file {}: {e}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| format!("config file {}: {e}", path.display()))?;
    let mut argv = argv;
    for (key, value) in table {
        let id = key.replace('-', "_");
        let Some(arg) = command.get_arguments().find(|a| a.get_id() == id.as_str()) else {
            return Err(format!(
                "config file {}: unknown setting {key:?}",
                path.display()
            ));
        };
        let given = matches!(
            matches.value_source(&id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        );
        let Some(long) = arg.get_long().filter(|_| !given) else {
            continue;
        };
        let text = match value {
            toml::Value::Boolean(true) if !arg.get_action().takes_values() => {
                argv.push(format!("--{long}").into());
                continue;
            }
            toml::Value::Boolean(false) if !arg.get_action().takes_values() => continue,
            toml::Value::String(s) => s,
            toml::Value::Array(items) => items
                .iter()
                .map(|i| {
                    i.as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| i.to_string())
                })
                .collect::<Vec<_>>()
                .join(","),
            other => other.to_string(),
        };
        argv.push(format!("--{long}={text}").into());
    }
    A::try_parse_from(argv).map_err(|e| format!("config file {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Parser)]
    struct Demo {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, default_value = "127.0.0.1:1883")]
        mqtt_addr: String,
        #[arg(long, default_value_t = 10)]
        limit: u32,
        #[arg(long)]
        open: bool,
    }

    #[test]
    fn file_fills_what_flags_leave_at_default() {
        let dir = std::env::temp_dir().join(format!("fleet-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("demo.toml");
        std::fs::write(
            &file,
            "mqtt_addr = \"0.0.0.0:1883\"\nlimit = 5\nopen = true\n",
        )
        .unwrap();
        let args = |extra: &[&str]| {
            let mut argv: Vec<OsString> =
                vec!["demo".into(), "--config".into(), file.clone().into()];
            argv.extend(extra.iter().map(OsString::from));
            parse_from_with_file::<Demo>(argv, "config").unwrap()
        };
        let from_file = args(&[]);
        assert_eq!(
            (
                from_file.mqtt_addr.as_str(),
                from_file.limit,
                from_file.open
            ),
            ("0.0.0.0:1883", 5, true)
        );
        let flag_wins = args(&["--limit", "7"]);
        assert_eq!(flag_wins.limit, 7);
        std::fs::write(&file, "colour = \"red\"\n").unwrap();
        let argv: Vec<OsString> = vec!["demo".into(), "--config".into(), file.clone().into()];
        assert!(
            parse_from_with_file::<Demo>(argv, "config")
                .unwrap_err()
                .contains("unknown setting")
        );
    }
}
