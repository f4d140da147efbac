//! The loss curve as an SVG picture: training loss a line, held-out loss dots, the
//! unigram baseline dashed. Written by hand: a few shapes need no plotting crate.

use std::fmt::Write;

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 420.0;
/// Room for the axes' labels: left, right, top, bottom.
const MARGIN: [f64; 4] = [60.0, 20.0, 30.0, 45.0];

/// The picture of `losses` (`(step, training loss, held-out loss)`), with the
/// `baseline` loss as a dashed line.
pub fn loss_svg(losses: &[(usize, f32, Option<f32>)], baseline: f64) -> String {
    let last_step = losses.iter().map(|l| l.0).max().unwrap_or(0).max(1) as f64;
    let values = losses
        .iter()
        .flat_map(|l| [Some(l.1), l.2])
        .flatten()
        .map(f64::from)
        .chain([baseline]);
    let (low, high) = values.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (low, high) = (low.min(high - 1e-6).max(0.0) * 0.95, high * 1.02);
    let [left, right, top, bottom] = MARGIN;
    let x = |step: f64| left + step / last_step * (WIDTH - left - right);
    let y = |loss: f64| top + (high - loss) / (high - low) * (HEIGHT - top - bottom);

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    // Axes, with five labelled ticks on each.
    let (x0, x1, y0, y1) = (left, WIDTH - right, top, HEIGHT - bottom);
    let _ = writeln!(
        svg,
        r#"<path d="M{x0},{y0} V{y1} H{x1}" stroke="black" fill="none"/>"#
    );
    for i in 0..=4 {
        let step = last_step * i as f64 / 4.0;
        let loss = low + (high - low) * i as f64 / 4.0;
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{step:.0}</text>"#,
            x(step),
            y1 + 18.0
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{loss:.2}</text>"#,
            x0 - 6.0,
            y(loss) + 4.0
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">step</text>"#,
        (x0 + x1) / 2.0,
        HEIGHT - 8.0
    );
    let _ = writeln!(
        svg,
        r#"<text x="{x0}" y="18">loss (nats per byte): training (line), held-out (dots), unigram baseline (dashed)</text>"#
    );
    let _ = writeln!(
        svg,
        r##"<line x1="{x0}" x2="{x1}" y1="{0:.1}" y2="{0:.1}" stroke="#888" stroke-dasharray="6 4"/>"##,
        y(baseline)
    );
    let line: Vec<String> = losses
        .iter()
        .map(|&(s, l, _)| format!("{:.1},{:.1}", x(s as f64), y(l.into())))
        .collect();
    let _ = writeln!(
        svg,
        r##"<polyline points="{}" stroke="#1f77b4" stroke-width="1.5" fill="none"/>"##,
        line.join(" ")
    );
    for &(s, _, held_out) in losses {
        if let Some(l) = held_out {
            let _ = writeln!(
                svg,
                r##"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="#d62728"/>"##,
                x(s as f64),
                y(l.into())
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every training point is on the line, every held-out point a dot, and the
    /// falling loss is drawn falling (SVG's y grows downwards).
    #[test]
    fn the_picture_holds_every_point() {
        let losses = [
            (1, 5.0, None),
            (2, 4.0, Some(4.5)),
            (3, 3.0, None),
            (4, 2.0, Some(2.5)),
        ];
        let svg = loss_svg(&losses, 3.5);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<circle").count(), 2);
        let points = svg
            .split("points=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap();
        let ys: Vec<f64> = points
            .split(' ')
            .map(|p| p.split(',').nth(1).unwrap().parse().unwrap())
            .collect();
        assert_eq!(ys.len(), 4);
        assert!(ys.windows(2).all(|w| w[0] < w[1]), "{ys:?}");
    }
}
