//! monitoring/alerts.yml through promtool: it loads, its unit tests pass, and every alert
//! is tested both ways and tells on-call what to run.

use std::collections::BTreeMap;
use std::process::Command;

use crate::support::{read_repo_file, repo_file, tool};
use crate::util::run;

/// The alert names of alerts.yml, in order, each with its block of text.
pub fn alert_blocks() -> Vec<(String, String)> {
    let text = read_repo_file("monitoring/alerts.yml");
    let mut blocks: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if let Some(name) = line.trim_start().strip_prefix("- alert:") {
            blocks.push((name.trim().to_string(), String::new()));
        } else if let Some((_, block)) = blocks.last_mut() {
            block.push_str(line);
            block.push('\n');
        }
    }
    blocks
}

/// The PromQL of every rule of alerts.yml (`expr:` on one line or as a `|` block).
pub fn alert_exprs() -> Vec<(String, String)> {
    alert_blocks()
        .into_iter()
        .map(|(name, block)| {
            let mut expr = String::new();
            let mut in_expr = false;
            for line in block.lines() {
                let t = line.trim();
                if let Some(rest) = t.strip_prefix("expr:") {
                    in_expr = true;
                    expr.push_str(rest.trim().trim_start_matches('|'));
                } else if in_expr
                    && (t.starts_with("for:") || t.starts_with("labels:") || t.starts_with("annotations:"))
                {
                    in_expr = false;
                } else if in_expr {
                    expr.push(' ');
                    expr.push_str(t);
                }
            }
            (name, expr.trim().to_string())
        })
        .collect()
}

#[test]
fn promtool_check_rules_accepts_the_alert_rules() {
    let promtool = tool("promtool");
    let r = run(Command::new(promtool).args(["check", "rules"]).arg(repo_file("monitoring/alerts.yml")));
    assert_eq!(r.code, Some(0), "promtool check rules monitoring/alerts.yml\n{r}");
    let n = alert_blocks().len();
    assert!(r.stdout.contains(&format!("SUCCESS: {n} rules found")), "{r}");
}

#[test]
fn promtool_unit_tests_of_the_alert_rules_pass() {
    let promtool = tool("promtool");
    let r = run(Command::new(promtool).args(["test", "rules"]).arg(repo_file("monitoring/alerts.test.yml")));
    assert_eq!(r.code, Some(0), "promtool test rules monitoring/alerts.test.yml\n{r}");
    assert!(r.stdout.contains("SUCCESS"), "{r}");
}

/// promtool passes a file that tests nothing: make sure each alert has a case where it
/// fires (`exp_labels`) and one where it stays quiet (`exp_alerts: []`).
#[test]
fn every_alert_has_a_unit_test_where_it_fires_and_one_where_it_stays_quiet() {
    let tests = read_repo_file("monitoring/alerts.test.yml");
    let mut seen: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut current = String::new();
    for line in tests.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("alertname:") {
            current = name.trim().to_string();
        } else if line.starts_with("exp_alerts: []") {
            seen.entry(current.clone()).or_default().1 += 1;
        } else if line.starts_with("- exp_labels:") {
            seen.entry(current.clone()).or_default().0 += 1;
        }
    }
    let alerts = alert_blocks();
    assert!(alerts.len() >= 7, "alerts.yml: {:?}", alerts.iter().map(|a| &a.0).collect::<Vec<_>>());
    for (name, _) in &alerts {
        let (fires, quiet) = seen.get(name).copied().unwrap_or_default();
        assert!(fires > 0, "alerts.test.yml has no case where {name} fires");
        assert!(quiet > 0, "alerts.test.yml has no case where {name} stays quiet");
    }
    for name in seen.keys() {
        assert!(alerts.iter().any(|(a, _)| a == name), "alerts.test.yml tests {name}, which alerts.yml lacks");
    }
}

/// On-call acts on the alert alone: a severity, a summary and a description naming the
/// chronicle command to run; terminal failures keep their error_reason.
#[test]
fn every_alert_has_a_severity_and_says_what_to_run() {
    for (name, block) in alert_blocks() {
        assert!(
            ["severity: critical", "severity: warning", "severity: info"].iter().any(|s| block.contains(s)),
            "{name}: no severity label (critical, warning or info)"
        );
        assert!(block.contains("summary:"), "{name}: no summary annotation");
        assert!(block.contains("description:"), "{name}: no description annotation");
        assert!(block.contains("`chronicle "), "{name}: the description names no chronicle command");
    }
    let (_, failures) =
        alert_exprs().into_iter().find(|(n, _)| n == "ChronicleTerminalFailures").expect("ChronicleTerminalFailures");
    assert!(failures.contains("by (job, error_reason)"), "terminal failures must keep error_reason: {failures}");
}
