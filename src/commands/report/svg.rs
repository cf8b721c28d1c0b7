//! A small line-plot renderer: inline SVG with a frame, grid lines, tick labels on linear
//! scales (an optional second y axis on the right), one polyline per series, point markers,
//! a legend and a title. Points with a non-finite coordinate are skipped.

use super::html::escape;

/// Size of every plot, pixels.
pub const WIDTH: f64 = 520.0;
pub const HEIGHT: f64 = 320.0;
/// The plot area inside the frame: margins for the title and legend (top), the tick labels and
/// axis titles (left, right, bottom).
const LEFT: f64 = 70.0;
const RIGHT: f64 = 70.0;
const TOP: f64 = 56.0;
const BOTTOM: f64 = 44.0;
/// About this many tick labels per axis.
const TICKS: usize = 5;
const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

/// A linear map from the data interval `[lo, hi]` onto the pixel interval `[from, to]` (`to`
/// may be smaller than `from`: SVG's y axis points down).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scale {
    lo: f64,
    hi: f64,
    from: f64,
    to: f64,
}

impl Scale {
    /// `[lo, hi]` onto `[from, to]`; an empty interval (`lo == hi`) is widened around its value
    /// so a constant series draws as a level line in the middle.
    pub fn new(lo: f64, hi: f64, from: f64, to: f64) -> Self {
        let (lo, hi) = if hi > lo {
            (lo, hi)
        } else {
            let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
            (lo - pad, lo + pad)
        };
        Self { lo, hi, from, to }
    }

    /// The smallest and largest finite value of `values` onto `[from, to]`; `None` when no
    /// value is finite.
    pub fn fit(values: impl IntoIterator<Item = f64>, from: f64, to: f64) -> Option<Self> {
        let (lo, hi) = values
            .into_iter()
            .filter(|v| v.is_finite())
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            });
        (lo <= hi).then(|| Self::new(lo, hi, from, to))
    }

    pub fn map(&self, v: f64) -> f64 {
        self.from + (v - self.lo) / (self.hi - self.lo) * (self.to - self.from)
    }

    /// The data interval (after widening).
    pub fn domain(&self) -> (f64, f64) {
        (self.lo, self.hi)
    }

    /// Round tick values (1, 2 or 5 times a power of ten apart) inside the data interval, and
    /// the decimals their labels need.
    pub fn ticks(&self, about: usize) -> (Vec<f64>, usize) {
        let raw = (self.hi - self.lo) / about.max(1) as f64;
        let mag = 10f64.powf(raw.log10().floor());
        let step = [1.0, 2.0, 5.0, 10.0]
            .iter()
            .map(|m| m * mag)
            .find(|s| *s >= raw)
            .unwrap_or(10.0 * mag);
        let decimals = (-step.log10().floor()).max(0.0) as usize;
        let first = (self.lo / step).ceil() as i64;
        let last = (self.hi / step + 1e-9).floor() as i64;
        let ticks = (first..=last).map(|i| i as f64 * step).collect();
        (ticks, decimals)
    }
}

/// A tick label: `decimals` digits, no `-0`, large values in exponent form.
fn label(v: f64, decimals: usize) -> String {
    if v.abs() >= 1e6 {
        return format!("{v:.1e}");
    }
    let s = format!("{v:.decimals$}");
    if s.trim_start_matches('-')
        .chars()
        .all(|c| c == '0' || c == '.')
    {
        s.trim_start_matches('-').to_string()
    } else {
        s
    }
}

/// One line of a plot.
#[derive(Clone, Debug, Default)]
pub struct Series {
    pub name: String,
    /// `(x, y)` in drawing order; non-finite points are skipped.
    pub points: Vec<(f64, f64)>,
    /// Measured against the right-hand y axis.
    pub right: bool,
    pub dashed: bool,
    /// A dot at every point (sparse series such as validations).
    pub markers: bool,
}

impl Series {
    pub fn line(name: &str, points: Vec<(f64, f64)>) -> Self {
        Self {
            name: name.to_string(),
            points,
            ..Self::default()
        }
    }

    fn finite(&self) -> impl Iterator<Item = (f64, f64)> + '_ {
        (self.points.iter().copied()).filter(|(x, y)| x.is_finite() && y.is_finite())
    }
}

/// A titled plot with axis titles; `y2_label` names the right axis when a series uses it.
#[derive(Clone, Debug, Default)]
pub struct Plot {
    /// The `id` of the `<svg>` element.
    pub id: String,
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub y2_label: String,
    pub series: Vec<Series>,
}

fn f(v: f64) -> String {
    format!("{v:.1}")
}

impl Plot {
    /// Whether any series has a finite point.
    pub fn has_data(&self) -> bool {
        self.series.iter().any(|s| s.finite().next().is_some())
    }

    /// The plot as one `<svg>` element (its own namespace, so it is valid inline in XHTML).
    pub fn svg(&self) -> String {
        let (x0, x1, y0, y1) = (LEFT, WIDTH - RIGHT, HEIGHT - BOTTOM, TOP);
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" id=\"{id}\" class=\"plot\" width=\"{w}\" \
             height=\"{h}\" viewBox=\"0 0 {w} {h}\" role=\"img\">\n<title>{t}</title>\n\
             <rect x=\"0\" y=\"0\" width=\"{w}\" height=\"{h}\" fill=\"#fff\"/>\n\
             <text x=\"{cx}\" y=\"18\" text-anchor=\"middle\" font-size=\"14\" font-weight=\"bold\">{t}</text>\n",
            id = escape(&self.id),
            w = WIDTH,
            h = HEIGHT,
            t = escape(&self.title),
            cx = f(WIDTH / 2.0),
        );
        let points = |right: bool| {
            (self.series.iter())
                .filter(move |s| s.right == right)
                .flat_map(|s| s.finite())
        };
        let xs = Scale::fit(
            self.series.iter().flat_map(|s| s.finite()).map(|p| p.0),
            x0,
            x1,
        );
        let left = Scale::fit(points(false).map(|p| p.1), y0, y1);
        let right = Scale::fit(points(true).map(|p| p.1), y0, y1);
        s.push_str(&format!(
            "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#888\"/>\n",
            f(x0),
            f(y1),
            f(x1 - x0),
            f(y0 - y1)
        ));
        let Some(xs) = xs else {
            s.push_str(&format!(
                "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"#a33\">no data</text>\n</svg>",
                f(WIDTH / 2.0),
                f((y0 + y1) / 2.0)
            ));
            return s;
        };
        s.push_str(&self.axes(&xs, left.as_ref(), right.as_ref()));
        s.push_str(&self.lines(&xs, left.as_ref(), right.as_ref()));
        s.push_str(&self.legend());
        s.push_str("</svg>");
        s
    }

    /// Grid lines, tick labels and axis titles.
    fn axes(&self, xs: &Scale, left: Option<&Scale>, right: Option<&Scale>) -> String {
        let (x0, x1, y0, y1) = (LEFT, WIDTH - RIGHT, HEIGHT - BOTTOM, TOP);
        let mut s = String::new();
        let (ticks, dec) = xs.ticks(TICKS);
        for t in ticks {
            let x = f(xs.map(t));
            s.push_str(&format!(
                "<line x1=\"{x}\" y1=\"{}\" x2=\"{x}\" y2=\"{}\" stroke=\"#eee\"/>\
                 <text x=\"{x}\" y=\"{}\" text-anchor=\"middle\" font-size=\"11\">{}</text>\n",
                f(y1),
                f(y0),
                f(y0 + 15.0),
                label(t, dec)
            ));
        }
        for (scale, is_right) in [(left, false), (right, true)] {
            let Some(ys) = scale else { continue };
            let (ticks, dec) = ys.ticks(TICKS);
            for t in ticks {
                let y = f(ys.map(t));
                let (tx, anchor) = if is_right {
                    (x1 + 6.0, "start")
                } else {
                    (x0 - 6.0, "end")
                };
                if !is_right || left.is_none() {
                    s.push_str(&format!(
                        "<line x1=\"{}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"#eee\"/>",
                        f(x0),
                        f(x1)
                    ));
                }
                s.push_str(&format!(
                    "<text x=\"{}\" y=\"{y}\" dy=\"4\" text-anchor=\"{anchor}\" font-size=\"11\">{}</text>\n",
                    f(tx),
                    label(t, dec)
                ));
            }
        }
        s.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"12\">{}</text>\n",
            f((x0 + x1) / 2.0),
            f(HEIGHT - 8.0),
            escape(&self.x_label)
        ));
        let mid = f((y0 + y1) / 2.0);
        if left.is_some() {
            s.push_str(&format!(
                "<text x=\"16\" y=\"{mid}\" transform=\"rotate(-90 16 {mid})\" text-anchor=\"middle\" \
                 font-size=\"12\">{}</text>\n",
                escape(&self.y_label)
            ));
        }
        if right.is_some() {
            let xr = f(WIDTH - 12.0);
            s.push_str(&format!(
                "<text x=\"{xr}\" y=\"{mid}\" transform=\"rotate(90 {xr} {mid})\" text-anchor=\"middle\" \
                 font-size=\"12\">{}</text>\n",
                escape(&self.y2_label)
            ));
        }
        s
    }

    /// One polyline per series with two or more points, and its markers.
    fn lines(&self, xs: &Scale, left: Option<&Scale>, right: Option<&Scale>) -> String {
        let mut s = String::new();
        for (i, series) in self.series.iter().enumerate() {
            let Some(ys) = (if series.right { right } else { left }) else {
                continue;
            };
            let color = COLORS[i % COLORS.len()];
            let pts: Vec<(String, String)> = series
                .finite()
                .map(|(x, y)| (f(xs.map(x)), f(ys.map(y))))
                .collect();
            if pts.len() >= 2 {
                let dash = if series.dashed {
                    " stroke-dasharray=\"6 3\""
                } else {
                    ""
                };
                let list: Vec<String> = pts.iter().map(|(x, y)| format!("{x},{y}")).collect();
                s.push_str(&format!(
                    "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\"{dash} points=\"{}\"/>\n",
                    list.join(" ")
                ));
            }
            if series.markers || pts.len() == 1 {
                for (x, y) in &pts {
                    s.push_str(&format!(
                        "<circle cx=\"{x}\" cy=\"{y}\" r=\"2.5\" fill=\"{color}\"/>"
                    ));
                }
                s.push('\n');
            }
        }
        s
    }

    /// A row of swatches under the title; a series with no finite point says so.
    fn legend(&self) -> String {
        let mut s = String::new();
        let mut x = LEFT;
        let y = 38.0;
        for (i, series) in self.series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let mut name = series.name.clone();
            if series.right {
                name.push_str(" (right axis)");
            }
            if series.finite().next().is_none() {
                name.push_str(" (no data)");
            }
            let dash = if series.dashed {
                " stroke-dasharray=\"6 3\""
            } else {
                ""
            };
            s.push_str(&format!(
                "<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"{color}\" stroke-width=\"2\"{dash}/>\
                 <text x=\"{}\" y=\"{}\" font-size=\"11\">{}</text>\n",
                f(x),
                f(y - 4.0),
                f(x + 18.0),
                f(y - 4.0),
                f(x + 22.0),
                f(y),
                escape(&name)
            ));
            x += 34.0 + 6.0 * name.chars().count() as f64;
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_inside_the_domain() {
        // Range 0.84 over about 5 ticks: raw step 0.168 rounds up to 0.2.
        let s = Scale::new(0.13, 0.97, 0.0, 100.0);
        let (ticks, decimals) = s.ticks(5);
        assert_eq!(decimals, 1);
        let want = [0.2, 0.4, 0.6, 0.8];
        assert_eq!(ticks.len(), want.len(), "{ticks:?}");
        assert!(
            ticks.iter().zip(want).all(|(t, w)| (t - w).abs() < 1e-9),
            "{ticks:?}"
        );
        assert_eq!(label(-0.0001, 2), "0.00");
    }

    #[test]
    fn non_finite_points_are_skipped() {
        let plot = Plot {
            id: "p".into(),
            series: vec![Series::line(
                "a",
                vec![(0.0, 1.0), (1.0, f64::NAN), (2.0, 3.0)],
            )],
            ..Plot::default()
        };
        let svg = plot.svg();
        let points = svg
            .split("points=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        assert_eq!(points.split(' ').count(), 2, "{points}");
    }
}
