//! A plot of the peers benchmark as an SVG file: one panel per figure, one horizontal bar per
//! peer, each bar labelled with its value. Written by hand, no external tool.

use std::fmt::Write as _;

/// One bar.
pub struct Bar {
    pub label: String,
    /// NaN: not measured (drawn as "n/a").
    pub value: f64,
    pub color: &'static str,
}

/// One panel.
pub struct Panel {
    pub title: String,
    /// Formats a value for its label.
    pub fmt: fn(f64) -> String,
    pub bars: Vec<Bar>,
}

const W: f64 = 900.0;
const LABEL_W: f64 = 170.0;
const BAR_H: f64 = 18.0;
const GAP: f64 = 5.0;
const TITLE_H: f64 = 26.0;
const PANEL_GAP: f64 = 16.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Renders the panels under a title and a subtitle.
pub fn render(title: &str, subtitle: &str, panels: &[Panel]) -> String {
    let mut h = 60.0;
    for p in panels {
        h += TITLE_H + p.bars.len() as f64 * (BAR_H + GAP) + PANEL_GAP;
    }
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="12" y="24" font-size="16" font-weight="bold">{}</text>"#,
        esc(title)
    );
    let _ = writeln!(
        s,
        r##"<text x="12" y="44" fill="#555">{}</text>"##,
        esc(subtitle)
    );
    let mut y = 60.0;
    let plot_w = W - LABEL_W - 110.0;
    for p in panels {
        let _ = writeln!(
            s,
            r#"<text x="12" y="{}" font-weight="bold">{}</text>"#,
            y + 17.0,
            esc(&p.title)
        );
        y += TITLE_H;
        let max = p
            .bars
            .iter()
            .map(|b| b.value)
            .filter(|v| v.is_finite())
            .fold(0.0f64, |a, b| a.max(b.abs()));
        for b in &p.bars {
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
                LABEL_W - 8.0,
                y + BAR_H - 5.0,
                esc(&b.label)
            );
            let _ = writeln!(
                s,
                r##"<line x1="{LABEL_W}" y1="{}" x2="{LABEL_W}" y2="{}" stroke="#999"/>"##,
                y - GAP / 2.0,
                y + BAR_H + GAP / 2.0
            );
            if b.value.is_finite() {
                let w = if max > 0.0 {
                    (b.value.abs() / max * plot_w).max(1.0)
                } else {
                    1.0
                };
                let _ = writeln!(
                    s,
                    r#"<rect x="{LABEL_W}" y="{y}" width="{w:.1}" height="{BAR_H}" fill="{}"/>"#,
                    b.color
                );
                let _ = writeln!(
                    s,
                    r#"<text x="{:.1}" y="{}">{}</text>"#,
                    LABEL_W + w + 6.0,
                    y + BAR_H - 5.0,
                    esc(&(p.fmt)(b.value))
                );
            } else {
                let _ = writeln!(
                    s,
                    r##"<text x="{}" y="{}" fill="#888">n/a</text>"##,
                    LABEL_W + 6.0,
                    y + BAR_H - 5.0
                );
            }
            y += BAR_H + GAP;
        }
        y += PANEL_GAP;
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_bars_and_na() {
        let svg = render(
            "t",
            "s <&>",
            &[Panel {
                title: "conn/s".into(),
                fmt: |v| format!("{v:.0}"),
                bars: vec![
                    Bar {
                        label: "a".into(),
                        value: 10.0,
                        color: "#123456",
                    },
                    Bar {
                        label: "b".into(),
                        value: f64::NAN,
                        color: "#123456",
                    },
                ],
            }],
        );
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("s &lt;&amp;&gt;"));
        assert!(svg.contains(">n/a<"));
        assert!(svg.trim_end().ends_with("</svg>"));
    }
}
