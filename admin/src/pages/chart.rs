//! Server-rendered SVG: throughput of recent transfers as bars (no script, no build step).

use std::fmt::Write as _;

use dbsync_agent::transfer::Transfer;
use maud::{Markup, PreEscaped, html};

use super::layout;

/// Drawing size in SVG user units (the picture scales to the page width).
const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 180.0;
/// Room for the axis labels.
const LEFT: f64 = 64.0;
const BOTTOM: f64 = 22.0;
const TOP: f64 = 10.0;

/// One bar: a finished transfer's rows per second.
struct Bar {
    label: String,
    rows_per_sec: f64,
    title: String,
}

/// Rows per second of a transfer that moved rows and has both times; `None` otherwise.
fn throughput(t: &Transfer) -> Option<f64> {
    let started = t.started_at?;
    let completed = t.completed_at?;
    let millis = (completed - started).num_milliseconds().max(1);
    if t.records_transferred <= 0 {
        return None;
    }
    #[allow(clippy::cast_precision_loss)]
    Some(t.records_transferred as f64 * 1000.0 / millis as f64)
}

/// A bar chart of the rows per second of `transfers` (given newest first, drawn oldest on the
/// left), or a sentence when none of them moved rows. `caption` names what is drawn.
pub(crate) fn throughput_chart(transfers: &[Transfer], caption: &str) -> Markup {
    let bars: Vec<Bar> = transfers
        .iter()
        .rev()
        .filter_map(|t| {
            let rate = throughput(t)?;
            Some(Bar {
                label: t.table_name.clone(),
                rows_per_sec: rate,
                title: format!(
                    "{} at {}: {} rows in {}, {} rows/s, {} on the wire",
                    t.table_name,
                    t.completed_at
                        .map(|c| c.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                        .unwrap_or_default(),
                    layout::number(t.records_transferred),
                    t.started_at
                        .zip(t.completed_at)
                        .map(|(s, c)| format!(
                            "{:.1} s",
                            (c - s).num_milliseconds() as f64 / 1000.0
                        ))
                        .unwrap_or_default(),
                    layout::number(rate.round() as i64),
                    layout::bytes(t.bytes_wire),
                ),
            })
        })
        .collect();
    if bars.is_empty() {
        return html! { p.empty { "No finished transfer with rows to chart yet." } };
    }
    let svg = render(&bars, caption);
    html! {
        figure.chart {
            (PreEscaped(svg))
            figcaption { (caption) }
        }
    }
}

/// A round number at or above `value` (1, 2 or 5 times a power of ten).
fn nice_ceiling(value: f64) -> f64 {
    if value <= 0.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(value.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|step| step * magnitude)
        .find(|candidate| *candidate >= value)
        .unwrap_or(10.0 * magnitude)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn render(bars: &[Bar], caption: &str) -> String {
    let top = nice_ceiling(bars.iter().map(|b| b.rows_per_sec).fold(0.0, f64::max));
    let plot_width = WIDTH - LEFT;
    let plot_height = HEIGHT - TOP - BOTTOM;
    #[allow(clippy::cast_precision_loss)]
    let slot = plot_width / bars.len() as f64;
    let bar_width = (slot * 0.7).clamp(1.0, 40.0);
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg class="throughput" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{}" xmlns="http://www.w3.org/2000/svg">"#,
        escape(caption)
    );
    // Gridlines and labels at 0, half and the top.
    for fraction in [0.0, 0.5, 1.0] {
        let y = TOP + plot_height * (1.0 - fraction);
        let _ = write!(
            svg,
            r#"<line class="grid" x1="{LEFT}" y1="{y:.1}" x2="{WIDTH}" y2="{y:.1}"/><text class="axis" x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 6.0,
            y + 4.0,
            layout::number((top * fraction).round() as i64)
        );
    }
    let _ = write!(
        svg,
        r#"<text class="axis" x="{LEFT}" y="{:.1}">rows/s, oldest left</text>"#,
        HEIGHT - 4.0
    );
    for (i, bar) in bars.iter().enumerate() {
        let height = (bar.rows_per_sec / top * plot_height).max(1.0);
        #[allow(clippy::cast_precision_loss)]
        let x = LEFT + slot * i as f64 + (slot - bar_width) / 2.0;
        let y = TOP + plot_height - height;
        let _ = write!(
            svg,
            r#"<rect class="bar" data-table="{}" x="{x:.1}" y="{y:.1}" width="{bar_width:.1}" height="{height:.1}"><title>{}</title></rect>"#,
            escape(&bar.label),
            escape(&bar.title)
        );
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_tops() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(7.0), 10.0);
        assert_eq!(nice_ceiling(130_000.0), 200_000.0);
        assert_eq!(nice_ceiling(500.0), 500.0);
    }

    #[test]
    fn names_are_escaped() {
        let svg = render(
            &[Bar {
                label: "a<b".into(),
                rows_per_sec: 10.0,
                title: "\"x\" & y".into(),
            }],
            "c<",
        );
        assert!(svg.contains("a&lt;b") && svg.contains("&quot;x&quot; &amp; y"));
        assert!(!svg.contains("a<b"));
        assert!(svg.contains("aria-label=\"c&lt;\""));
    }
}
