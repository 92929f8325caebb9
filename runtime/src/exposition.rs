//! Prometheus text exposition for every `/metrics`.
//!
//! `prometheus-client` writes OpenMetrics, where a counter family is named without its
//! `_total` suffix. Prometheus' own text format (what `promtool check metrics` lints, and
//! what every scraper reads) names the family like its samples. This renames counter
//! families and drops the OpenMetrics-only lines.

use prometheus_client::registry::Registry;

/// Content type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The registry in Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut openmetrics = String::new();
    if let Err(error) = prometheus_client::encoding::text::encode(&mut openmetrics, registry) {
        tracing::error!(%error, "cannot encode metrics");
    }
    from_openmetrics(&openmetrics)
}

/// Converts OpenMetrics text to Prometheus text format.
pub fn from_openmetrics(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut pending_help: Option<&str> = None;
    for line in text.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if line.starts_with("# HELP ") {
            // Held until the TYPE line tells whether the family is a counter.
            pending_help = Some(line);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let family = if kind == "counter" && !name.ends_with("_total") {
                format!("{name}_total")
            } else {
                name.to_owned()
            };
            if let Some(help) = pending_help.take() {
                let text = help
                    .strip_prefix("# HELP ")
                    .and_then(|h| h.split_once(' '))
                    .map(|(_, text)| text)
                    .unwrap_or("");
                out.push_str(&format!("# HELP {family} {text}\n"));
            }
            out.push_str(&format!("# TYPE {family} {kind}\n"));
            continue;
        }
        if let Some(help) = pending_help.take() {
            out.push_str(help);
            out.push('\n');
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Several expositions served as one: each family as its first text has it, a family
/// that an earlier text already had left out (two registries of one process both
/// describe the process; Prometheus refuses a family twice).
pub fn merge(texts: impl IntoIterator<Item = String>) -> String {
    let mut served: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut out = String::new();
    for text in texts {
        let mut families = Vec::new();
        let mut skipping = false;
        for line in text.lines() {
            let header = line
                .strip_prefix("# HELP ")
                .or_else(|| line.strip_prefix("# TYPE "));
            if let Some(family) = header.and_then(|rest| rest.split(' ').next()) {
                skipping = served.contains(family);
                if !skipping {
                    families.push(family.to_owned());
                }
            }
            if !skipping {
                out.push_str(line);
                out.push('\n');
            }
        }
        served.extend(families);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_expositions_keep_each_family_once() {
        let gateway = "# HELP up Up.\n# TYPE up gauge\nup 1\n# HELP process_threads Threads.\n\
                       # TYPE process_threads gauge\nprocess_threads 4\n";
        let broker = "# HELP process_threads Threads.\n# TYPE process_threads gauge\n\
                      process_threads 4\n# HELP jobs_total Jobs.\n# TYPE jobs_total counter\n\
                      jobs_total{topic=\"a\"} 3\n";
        assert_eq!(
            merge([gateway.to_owned(), broker.to_owned()]),
            format!(
                "{gateway}# HELP jobs_total Jobs.\n# TYPE jobs_total counter\n\
                 jobs_total{{topic=\"a\"}} 3\n"
            )
        );
    }

    #[test]
    fn counters_are_named_like_their_samples() {
        let openmetrics = "# HELP jobs Jobs done.\n# TYPE jobs counter\njobs_total 3\n\
                           # HELP up Up.\n# TYPE up gauge\nup 1\n# EOF\n";
        assert_eq!(
            from_openmetrics(openmetrics),
            "# HELP jobs_total Jobs done.\n# TYPE jobs_total counter\njobs_total 3\n\
             # HELP up Up.\n# TYPE up gauge\nup 1\n"
        );
    }
}
