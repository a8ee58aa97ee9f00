//! Minimal SVG charts for benchmark results (no plotting dependency).

use std::fmt::Write;

/// One group of bars (for example one metric), one bar per series.
pub struct Group {
    /// Label under the group.
    pub label: String,
    /// One value per series (`None` when not measured).
    pub values: Vec<Option<f64>>,
}

const COLORS: [&str; 4] = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759"];

/// A grouped bar chart. Each group is scaled to its own maximum (values are annotated), so
/// metrics of different magnitudes share one picture.
pub fn grouped_bars(title: &str, series: &[&str], groups: &[Group]) -> String {
    let (w, h, top, bottom, left) = (760.0, 420.0, 60.0, 70.0, 30.0);
    let plot_h = h - top - bottom;
    let group_w = (w - 2.0 * left) / groups.len().max(1) as f64;
    let bar_w = (group_w * 0.7) / series.len().max(1) as f64;
    let mut s = header(w, h, title, series, left);
    let base = top + plot_h;
    let _ = write!(
        s,
        r#"<line x1="{left}" y1="{base}" x2="{}" y2="{base}" stroke="black"/>"#,
        w - left
    );
    for (g, group) in groups.iter().enumerate() {
        let max = group
            .values
            .iter()
            .flatten()
            .copied()
            .fold(0.0, f64::max)
            .max(1e-12);
        let gx = left + g as f64 * group_w + group_w * 0.15;
        for (i, v) in group.values.iter().enumerate() {
            let Some(v) = v else { continue };
            let bh = plot_h * 0.9 * v / max;
            let x = gx + i as f64 * bar_w;
            let _ = write!(
                s,
                r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{bh:.1}" fill="{}"/>"#,
                base - bh,
                bar_w * 0.9,
                COLORS[i % COLORS.len()]
            );
            let _ = write!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{}</text>"#,
                x + bar_w * 0.45,
                base - bh - 4.0,
                format_value(*v)
            );
        }
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            left + g as f64 * group_w + group_w / 2.0,
            base + 20.0,
            escape(&group.label)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn format_value(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// The SVG opening, white background, title and legend.
fn header(w: f64, h: f64, title: &str, series: &[&str], left: f64) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = write!(
        s,
        r#"<text x="{}" y="24" font-size="16" text-anchor="middle">{}</text>"#,
        w / 2.0,
        escape(title)
    );
    for (i, name) in series.iter().enumerate() {
        let x = left + 10.0 + i as f64 * 150.0;
        let _ = write!(
            s,
            r#"<rect x="{x}" y="36" width="12" height="12" fill="{}"/>"#,
            COLORS[i % COLORS.len()]
        );
        let _ = write!(
            s,
            r#"<text x="{}" y="46">{}</text>"#,
            x + 16.0,
            escape(name)
        );
    }
    s
}

/// A line chart on one linear y axis from 0: one line per series over the x labels (for
/// example latency percentiles against load).
pub fn lines(
    title: &str,
    y_label: &str,
    x_labels: &[String],
    series: &[(&str, Vec<f64>)],
) -> String {
    let (w, h, top, bottom, left, right) = (760.0, 420.0, 60.0, 60.0, 70.0, 30.0);
    let names: Vec<&str> = series.iter().map(|(n, _)| *n).collect();
    let mut s = header(w, h, title, &names, left);
    let max = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(0.0, f64::max)
        .max(f64::MIN_POSITIVE);
    let (plot_w, plot_h) = (w - left - right, h - top - bottom);
    let x = |i: usize| left + plot_w * (i as f64 + 0.5) / x_labels.len().max(1) as f64;
    let y = |v: f64| top + plot_h * (1.0 - v / max);
    let _ = write!(
        s,
        r#"<line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="black"/><line x1="{left}" y1="{top}" x2="{left}" y2="{}" stroke="black"/>"#,
        top + plot_h,
        w - right,
        top + plot_h,
        top + plot_h
    );
    for k in 0..=4 {
        let v = max * k as f64 / 4.0;
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{v:.1}</text>"#,
            left - 6.0,
            y(v) + 4.0
        );
    }
    let _ = write!(
        s,
        r#"<text x="16" y="{}" transform="rotate(-90 16 {})" text-anchor="middle">{}</text>"#,
        top + plot_h / 2.0,
        top + plot_h / 2.0,
        escape(y_label)
    );
    for (i, label) in x_labels.iter().enumerate() {
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            x(i),
            top + plot_h + 18.0,
            escape(label)
        );
    }
    for (j, (_, values)) in series.iter().enumerate() {
        let points: Vec<String> = values
            .iter()
            .enumerate()
            .map(|(i, v)| format!("{:.1},{:.1}", x(i), y(*v)))
            .collect();
        let _ = write!(
            s,
            r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"#,
            COLORS[j % COLORS.len()],
            points.join(" ")
        );
    }
    s.push_str("</svg>\n");
    s
}

fn escape(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_has_a_bar_per_measured_value() {
        let svg = grouped_bars(
            "t <1>",
            &["a", "b"],
            &[
                Group {
                    label: "x".into(),
                    values: vec![Some(1.0), Some(2.0)],
                },
                Group {
                    label: "y".into(),
                    values: vec![Some(300.0), None],
                },
            ],
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert_eq!(
            svg.matches("<rect").count(),
            1 + 2 + 3,
            "background, legend, bars"
        );
        assert!(svg.contains("t &lt;1&gt;"));
    }

    #[test]
    fn line_chart_has_a_line_per_series() {
        let svg = lines(
            "latency",
            "ms",
            &["1".into(), "2".into(), "4".into()],
            &[("p50", vec![1.0, 2.0, 3.0]), ("p99", vec![2.0, 4.0, 8.0])],
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches(" points=").count(), 2);
    }
}
