//! The `--preview` picture: three orthogonal slices of a volume with its
//! labels overlaid in colour, side by side, so a person can check a result
//! without a viewer.
//!
//! # What it shows
//! - Panels, left to right: **axial**, **coronal**, **sagittal**, separated
//!   by [`GAP`] black columns and centred vertically.
//! - All three pass through one voxel: the labelled voxel nearest (in mm) to
//!   the centroid of all labelled voxels, so each panel cuts the labelled
//!   region even when it is not convex (two hippocampi, a ring); the volume
//!   centre when nothing is labelled.
//! - **Radiological convention**: superior is up (coronal, sagittal),
//!   anterior is up (axial), the patient's right is on the image **left** and
//!   the patient's left on the image right (axial, coronal), and anterior is
//!   on the image left (sagittal). The volume is first brought to canonical
//!   RAS+ axis order with [`Reorientation`] (axis permutation and flips from
//!   the affine, no interpolation), so the stored axis order of the file
//!   does not matter; an oblique scan is shown along its nearest axes.
//! - Square pixels of the smallest voxel spacing (nearest neighbour), so
//!   anisotropic volumes keep their true proportions; no panel side exceeds
//!   [`MAX_PANEL_PIXELS`].
//! - Grey levels: the intensity window is the 1st to 99th percentile of the
//!   finite voxels of the whole volume, mapped linearly to 0-255 and
//!   clipped; NaN and infinite voxels are black.
//! - Labels: the colour of class `k` (its position in the class list) is
//!   [`colour`]`(k)`, blended over the grey level with opacity [`ALPHA`];
//!   background (0) is not coloured.

use iris_core::Result;
use iris_core::preprocess::{Reorientation, percentiles};
use iris_core::volume::{Image, LabelMap};

/// Opacity of the label colours over the grey image.
pub const ALPHA: f32 = 0.5;
/// Black columns between two panels.
pub const GAP: usize = 4;
/// Longest side of one panel, in pixels.
pub const MAX_PANEL_PIXELS: usize = 1024;

/// The first colours, as distinct from each other as possible (Sasha
/// Trubetskoy's list of 20 distinct colours, first 12).
const PALETTE: [[u8; 3]; 12] = [
    [230, 25, 75],
    [60, 180, 75],
    [255, 225, 25],
    [0, 130, 200],
    [245, 130, 48],
    [145, 30, 180],
    [70, 240, 240],
    [240, 50, 230],
    [210, 245, 60],
    [250, 190, 212],
    [0, 128, 128],
    [170, 110, 40],
];

/// The overlay colour of class number `index` (0-based position in the
/// class list): the fixed palette first, then hues spaced by the golden
/// ratio. No colour is grey (its three channels are never all equal).
pub fn colour(index: usize) -> [u8; 3] {
    if let Some(c) = PALETTE.get(index) {
        return *c;
    }
    let hue = (index as f64 * 0.618_033_988_749_895).fract() * 6.0;
    let (value, saturation) = (242.0, 0.85);
    let low = value * (1.0 - saturation);
    let ramp = |x: f64| low + (value - low) * x.clamp(0.0, 1.0);
    // Piecewise-linear HSV to RGB: each channel's distance from its hue.
    let channel = |centre: f64| {
        let d = (hue - centre).rem_euclid(6.0);
        let d = d.min(6.0 - d);
        ramp(2.0 - d).round() as u8
    };
    [channel(0.0), channel(2.0), channel(4.0)]
}

/// An 8-bit RGB picture, row-major, top row first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rgb {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `width * height * 3` bytes: R, G, B of each pixel.
    pub pixels: Vec<u8>,
}

impl Rgb {
    fn black(width: usize, height: usize) -> Rgb {
        Rgb {
            width,
            height,
            pixels: vec![0; width * height * 3],
        }
    }

    /// The pixel in column `x`, row `y` (0: top).
    #[cfg(test)]
    pub fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        let i = (y * self.width + x) * 3;
        [self.pixels[i], self.pixels[i + 1], self.pixels[i + 2]]
    }

    fn set(&mut self, x: usize, y: usize, rgb: [u8; 3]) {
        let i = (y * self.width + x) * 3;
        self.pixels[i..i + 3].copy_from_slice(&rgb);
    }
}

/// Where one panel lies in the picture, in pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Panel {
    /// First column.
    pub left: usize,
    /// First row.
    pub top: usize,
    /// Width.
    pub width: usize,
    /// Height.
    pub height: usize,
}

/// A rendered preview and how it was laid out.
#[derive(Clone, Debug)]
pub struct Preview {
    /// The picture.
    pub rgb: Rgb,
    /// Axial, coronal and sagittal panels, in that order.
    pub panels: [Panel; 3],
    /// The voxel all three slices pass through, `[d, h, w]` on the
    /// canonical RAS+ grid (`d` to superior, `h` to anterior, `w` to right).
    pub point: [usize; 3],
    /// The same voxel in world coordinates, mm RAS+ `[x, y, z]`.
    pub point_mm: [f64; 3],
    /// The intensity window `(1st, 99th percentile)` mapped to 0 and 255.
    pub window: (f32, f32),
}

/// One panel: the canonical axis held fixed, the axis drawn down the rows
/// and the one drawn across the columns. Rows and columns both run from the
/// high end of their axis (superior, anterior, right) to the low end.
struct Layout {
    fixed: usize,
    rows: usize,
    columns: usize,
}

/// Axial (fixed `d`: anterior up, right on the left), coronal (fixed `h`:
/// superior up, right on the left), sagittal (fixed `w`: superior up,
/// anterior on the left).
const LAYOUTS: [Layout; 3] = [
    Layout {
        fixed: 0,
        rows: 1,
        columns: 2,
    },
    Layout {
        fixed: 1,
        rows: 0,
        columns: 2,
    },
    Layout {
        fixed: 2,
        rows: 0,
        columns: 1,
    },
];

/// Renders the preview of `image` with `labels` (same grid) overlaid;
/// `classes` orders the colours (a label not listed gets the colour after
/// the listed ones, by value). See the module docs for the conventions.
///
/// # Errors
/// As [`LabelMap::ensure_same_grid`] when the grids differ.
pub fn render(image: &Image, labels: &LabelMap, classes: &[u16]) -> Result<Preview> {
    image.ensure_same_grid(labels, "preview label map vs image")?;
    let plan = Reorientation::plan(image.geometry())?;
    let (image, labels) = (plan.apply(image)?, plan.apply(labels)?);
    let (data, label_data) = (image.data(), labels.data());
    let shape = image.shape();
    let spacing = image.geometry().spacing();

    let finite: Vec<f32> = data.iter().copied().filter(|v| v.is_finite()).collect();
    let window = match percentiles(&finite, &[1.0, 99.0]) {
        Ok(p) => (p[0], p[1]),
        // No finite voxel at all: everything is drawn black.
        Err(_) => (0.0, 0.0),
    };
    let grey = |v: f32| -> f32 {
        let (lo, hi) = window;
        if !v.is_finite() {
            0.0
        } else if hi > lo {
            ((v - lo) / (hi - lo)).clamp(0.0, 1.0) * 255.0
        } else if v > lo {
            255.0
        } else {
            0.0
        }
    };
    let paint = |v: f32, label: u16| -> [u8; 3] {
        let g = grey(v);
        if label == 0 {
            return [g.round() as u8; 3];
        }
        let index = classes
            .iter()
            .position(|&c| c == label)
            .unwrap_or(classes.len() + usize::from(label));
        colour(index).map(|c| ((1.0 - ALPHA) * g + ALPHA * f32::from(c)).round() as u8)
    };

    let point = focus(&labels, spacing);
    let point_mm = image.geometry().voxel_to_world(point.map(|i| i as f64));
    let smallest = spacing.iter().copied().fold(f64::INFINITY, f64::min);
    let largest_extent = (0..3)
        .map(|a| shape[a] as f64 * spacing[a])
        .fold(0.0, f64::max);
    let pixel_mm = smallest.max(largest_extent / MAX_PANEL_PIXELS as f64);
    // For each canonical axis, the voxel shown by each pixel, high end first.
    let maps: [Vec<usize>; 3] =
        core::array::from_fn(|a| pixels_to_voxels(shape[a], spacing[a], pixel_mm));

    let sizes = LAYOUTS.map(|l| (maps[l.columns].len(), maps[l.rows].len()));
    let width = sizes.iter().map(|s| s.0).sum::<usize>() + GAP * (sizes.len() - 1);
    let height = sizes.iter().map(|s| s.1).max().unwrap_or(1);
    let mut rgb = Rgb::black(width, height);
    let mut left = 0;
    let panels = core::array::from_fn(|p| {
        let (w, h) = sizes[p];
        let panel = Panel {
            left,
            top: (height - h) / 2,
            width: w,
            height: h,
        };
        left += w + GAP;
        panel
    });
    for (layout, panel) in LAYOUTS.iter().zip(&panels) {
        let mut voxel = point;
        for (y, &row) in maps[layout.rows].iter().enumerate() {
            voxel[layout.rows] = row;
            for (x, &column) in maps[layout.columns].iter().enumerate() {
                voxel[layout.columns] = column;
                debug_assert_eq!(voxel[layout.fixed], point[layout.fixed]);
                let colour = paint(data[voxel], label_data[voxel]);
                rgb.set(panel.left + x, panel.top + y, colour);
            }
        }
    }
    Ok(Preview {
        rgb,
        panels,
        point,
        point_mm,
        window,
    })
}

/// The voxel index shown by each pixel along an axis of `n` voxels of
/// `spacing` mm drawn at `pixel_mm` per pixel (nearest neighbour), starting
/// from the axis's high end.
fn pixels_to_voxels(n: usize, spacing: f64, pixel_mm: f64) -> Vec<usize> {
    let pixels = ((n as f64 * spacing / pixel_mm).round() as usize).max(1);
    (0..pixels)
        .map(|p| {
            let i = (((p as f64 + 0.5) * pixel_mm / spacing) as usize).min(n - 1);
            n - 1 - i
        })
        .collect()
}

/// The labelled voxel nearest (in mm, first in C order on a tie) to the
/// centroid of all labelled voxels; the centre voxel when none is labelled.
fn focus(labels: &LabelMap, spacing: [f64; 3]) -> [usize; 3] {
    let labels = labels.data();
    let (mut sum, mut count) = ([0.0f64; 3], 0usize);
    for ((d, h, w), _) in labels.indexed_iter().filter(|(_, v)| **v != 0) {
        for (s, i) in sum.iter_mut().zip([d, h, w]) {
            *s += i as f64;
        }
        count += 1;
    }
    let (d, h, w) = labels.dim();
    if count == 0 {
        return [(d - 1) / 2, (h - 1) / 2, (w - 1) / 2];
    }
    let centroid = sum.map(|s| s / count as f64);
    let mut best = ([0; 3], f64::INFINITY);
    for ((d, h, w), _) in labels.indexed_iter().filter(|(_, v)| **v != 0) {
        let index = [d, h, w];
        let distance: f64 = (0..3)
            .map(|a| ((index[a] as f64 - centroid[a]) * spacing[a]).powi(2))
            .sum();
        if distance < best.1 {
            best = (index, distance);
        }
    }
    best.0
}

/// The picture as PNG bytes (8-bit RGB).
///
/// # Errors
/// The encoder's message (in practice only for a picture over 2^32 pixels
/// wide or high, which [`render`] never makes).
pub fn encode_png(rgb: &Rgb) -> std::result::Result<Vec<u8>, String> {
    let side = |n: usize| u32::try_from(n).map_err(|_| format!("{n} pixels is too large for PNG"));
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, side(rgb.width)?, side(rgb.height)?);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let encode = || -> std::result::Result<(), png::EncodingError> {
        let mut writer = encoder.write_header()?;
        writer.write_image_data(&rgb.pixels)?;
        writer.finish()
    };
    encode().map_err(|e| e.to_string())?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use iris_core::volume::{Affine, Volume};
    use iris_test_support::data_file;

    /// A canonical grid: `d` to superior (z), `h` to anterior (y), `w` to
    /// right (x), with the given spacing in mm.
    fn ras(spacing: [f64; 3]) -> Affine {
        let [sd, sh, sw] = spacing;
        Affine([
            [0.0, 0.0, sw, -10.0],
            [0.0, sh, 0.0, 20.0],
            [sd, 0.0, 0.0, -30.0],
            [0.0, 0.0, 0.0, 1.0],
        ])
    }

    fn volume<T: Clone>(
        shape: [usize; 3],
        affine: Affine,
        f: impl Fn([usize; 3]) -> T,
    ) -> Volume<T> {
        let mut voxels = Vec::new();
        for d in 0..shape[0] {
            for h in 0..shape[1] {
                for w in 0..shape[2] {
                    voxels.push(f([d, h, w]));
                }
            }
        }
        Volume::from_vec(shape, affine, voxels).unwrap()
    }

    fn blend_on_black(c: [u8; 3]) -> [u8; 3] {
        c.map(|v| (ALPHA * f32::from(v)).round() as u8)
    }

    #[test]
    fn a_labelled_cube_is_coloured_exactly_where_it_lies() {
        let shape = [10, 12, 14];
        let image = volume(shape, ras([1.0; 3]), |_| 0.0f32);
        let inside = |[d, h, w]: [usize; 3]| {
            (2..5).contains(&d) && (3..7).contains(&h) && (8..11).contains(&w)
        };
        let labels = volume(shape, ras([1.0; 3]), |i| if inside(i) { 3u16 } else { 0 });
        let p = render(&image, &labels, &[3]).unwrap();
        // Centroid (3, 4.5, 9): voxels h = 4 and h = 5 are equally near, the first wins.
        assert_eq!(p.point, [3, 4, 9]);
        // Axial 14 x 12, coronal 14 x 10, sagittal 12 x 10, gaps of 4.
        assert_eq!((p.rgb.width, p.rgb.height), (14 + 4 + 14 + 4 + 12, 12));
        let panel = |left, top, width, height| Panel {
            left,
            top,
            width,
            height,
        };
        assert_eq!(
            p.panels,
            [
                panel(0, 0, 14, 12),
                panel(18, 1, 14, 10),
                panel(36, 1, 12, 10)
            ]
        );
        // Where the cube must appear, worked out by hand: rows run from
        // superior (or anterior) down, columns from the patient's right
        // (or anterior) across. Axial: row = 11 - h, column = 13 - w.
        // Coronal: row = 9 - d, column = 13 - w. Sagittal: row = 9 - d,
        // column = 11 - h.
        let expected: [(usize, [usize; 2], [usize; 2]); 3] = [
            (0, [5, 8], [3, 5]),
            (1, [5, 7], [3, 5]),
            (2, [5, 7], [5, 8]),
        ];
        let coloured = blend_on_black(colour(0));
        for y in 0..p.rgb.height {
            for x in 0..p.rgb.width {
                let want = expected.iter().any(|&(i, rows, cols)| {
                    let q = p.panels[i];
                    (q.top + rows[0]..=q.top + rows[1]).contains(&y)
                        && (q.left + cols[0]..=q.left + cols[1]).contains(&x)
                });
                let want = if want { coloured } else { [0; 3] };
                assert_eq!(p.rgb.pixel(x, y), want, "pixel ({x}, {y})");
            }
        }
    }

    /// The same anatomy stored in another axis order: storage axis `k` is
    /// canonical axis `perm[k]`, reversed where `flip[k]`.
    fn restore<T: Clone>(v: &Volume<T>, perm: [usize; 3], flip: [bool; 3]) -> Volume<T> {
        let n = v.shape();
        let shape = perm.map(|a| n[a]);
        // Storage index -> canonical index, as a 4x4 affine.
        let mut to_canonical = Affine([[0.0; 4], [0.0; 4], [0.0; 4], [0.0, 0.0, 0.0, 1.0]]);
        for k in 0..3 {
            let a = perm[k];
            to_canonical.0[a][k] = if flip[k] { -1.0 } else { 1.0 };
            to_canonical.0[a][3] = if flip[k] { (n[a] - 1) as f64 } else { 0.0 };
        }
        let affine = v.geometry().affine().compose(&to_canonical);
        volume(shape, affine, |i| {
            let mut a = [0; 3];
            for k in 0..3 {
                a[perm[k]] = if flip[k] { n[perm[k]] - 1 - i[k] } else { i[k] };
            }
            v.data()[a].clone()
        })
    }

    #[test]
    fn every_storage_order_gives_the_same_picture() {
        let shape = [5, 6, 7];
        let affine = ras([2.0, 1.0, 1.5]);
        let image = volume(shape, affine, |[d, h, w]| {
            ((d * 31 + h * 7 + w * 3) % 17) as f32
        });
        let labels = volume(shape, affine, |[d, h, w]| match (d, h, w) {
            (1..=2, 2..=4, 0..=2) => 1u16,
            (3, _, 5) => 2,
            _ => 0,
        });
        let reference = render(&image, &labels, &[2, 1]).unwrap();
        let perms = [
            [0, 1, 2],
            [0, 2, 1],
            [1, 0, 2],
            [1, 2, 0],
            [2, 0, 1],
            [2, 1, 0],
        ];
        for perm in perms {
            for bits in 0..8 {
                let flip = [bits & 1 != 0, bits & 2 != 0, bits & 4 != 0];
                let (i, l) = (restore(&image, perm, flip), restore(&labels, perm, flip));
                let p = render(&i, &l, &[2, 1]).unwrap();
                assert_eq!(p.point, reference.point, "{perm:?} {flip:?}");
                assert_eq!(p.rgb, reference.rgb, "{perm:?} {flip:?}");
            }
        }
        // And the storage order did change: the identity is one of 48.
        assert_ne!(
            restore(&image, [2, 1, 0], [true, false, false]).shape(),
            shape
        );
    }

    #[test]
    fn anisotropic_voxels_keep_their_proportions() {
        let shape = [5, 6, 7];
        let affine = ras([2.0, 1.0, 0.5]);
        let image = volume(shape, affine, |_| 0.0f32);
        // The most inferior slice (d = 0) is labelled.
        let labels = volume(shape, affine, |[d, _, _]| u16::from(d == 0));
        let p = render(&image, &labels, &[1]).unwrap();
        // 0.5 mm pixels: W = 3.5 mm -> 7, H = 6 mm -> 12, D = 10 mm -> 20.
        let sizes = p.panels.map(|q| (q.width, q.height));
        assert_eq!(sizes, [(7, 12), (7, 20), (12, 20)]);
        // In the coronal panel the 2 mm slice d = 0 is the bottom 4 rows.
        let coronal = p.panels[1];
        for y in 0..coronal.height {
            let px = p.rgb.pixel(coronal.left, coronal.top + y);
            let labelled = y >= coronal.height - 4;
            assert_eq!(px != [0; 3], labelled, "row {y}");
        }
    }

    #[test]
    fn grey_levels_span_the_1st_to_99th_percentile() {
        // One row of 101 voxels, values 0..=100 along w: percentiles 1 and 99.
        let image = volume([1, 1, 101], ras([1.0; 3]), |[_, _, w]| w as f32);
        let labels = volume([1, 1, 101], ras([1.0; 3]), |_| 0u16);
        let p = render(&image, &labels, &[]).unwrap();
        assert_eq!(p.window, (1.0, 99.0));
        assert_eq!(p.point, [0, 0, 50]);
        let axial = p.panels[0];
        assert_eq!((axial.width, axial.height), (101, 1));
        for x in 0..101 {
            // Column x shows w = 100 - x (the patient's right on the left).
            let v = (100 - x) as f32;
            let g = (((v - 1.0) / 98.0).clamp(0.0, 1.0) * 255.0).round() as u8;
            assert_eq!(p.rgb.pixel(axial.left + x, axial.top), [g; 3], "column {x}");
        }
        // The sagittal panel is the single voxel w = 50: (50 - 1) / 98 * 255.
        let s = p.panels[2];
        assert_eq!(p.rgb.pixel(s.left, s.top), [128; 3]);

        // NaN voxels are black and take no part in the window.
        let values = [f32::NAN, 10.0, 20.0, 30.0, 40.0];
        let image = volume([1, 1, 5], ras([1.0; 3]), |[_, _, w]| values[w]);
        let labels = volume([1, 1, 5], ras([1.0; 3]), |_| 0u16);
        let p = render(&image, &labels, &[]).unwrap();
        assert!((p.window.0 - 10.3).abs() < 1e-4 && (p.window.1 - 39.7).abs() < 1e-4);
        let axial = p.panels[0];
        assert_eq!(p.rgb.pixel(axial.left + 4, 0), [0; 3]);
        assert_eq!(p.rgb.pixel(axial.left, 0), [255; 3]);
    }

    #[test]
    fn labels_on_another_grid_are_refused() {
        let image = volume([4, 4, 4], ras([1.0; 3]), |_| 0.0f32);
        let labels = volume([4, 4, 5], ras([1.0; 3]), |_| 0u16);
        assert!(render(&image, &labels, &[]).is_err());
    }

    #[test]
    fn colours_are_distinct_and_never_grey() {
        let colours: Vec<[u8; 3]> = (0..64).map(colour).collect();
        for (i, c) in colours.iter().enumerate() {
            assert!(!(c[0] == c[1] && c[1] == c[2]), "colour {i} {c:?} is grey");
            assert!(!colours[..i].contains(c), "colour {i} {c:?} repeats");
        }
    }

    #[test]
    fn png_decodes_to_the_same_pixels() {
        let image = volume([3, 4, 5], ras([1.0; 3]), |[d, h, w]| (d + h + w) as f32);
        let labels = volume([3, 4, 5], ras([1.0; 3]), |[d, _, _]| u16::from(d == 1) * 4);
        let p = render(&image, &labels, &[4]).unwrap();
        let bytes = encode_png(&p.rgb).unwrap();
        let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
            .read_info()
            .unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!(
            (info.width as usize, info.height as usize),
            (p.rgb.width, p.rgb.height)
        );
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(&buf[..info.buffer_size()], &p.rgb.pixels[..]);
    }

    #[test]
    fn the_patients_left_is_on_the_image_right_on_a_real_brain() {
        let (Some(t1), Some(aal)) = (
            data_file("mricron/ch2.nii.gz"),
            data_file("mricron/aal.nii.gz"),
        ) else {
            return;
        };
        let (image, _) = iris_core::nifti::read_image(t1).unwrap();
        let (atlas, _) = iris_core::nifti::read_labels(aal).unwrap();
        // AAL: 1 = Precentral_L, 2 = Precentral_R (aal.nii.txt).
        for (label, left_side) in [(1u16, true), (2, false)] {
            let one = atlas.map(|&v| if v == label { v } else { 0 });
            let p = render(&image, &one, &[label]).unwrap();
            // Coloured pixels of the axial and coronal panels lie on the image
            // right for the patient's left, on the image left for the right.
            for q in &p.panels[..2] {
                let mut columns = Vec::new();
                for y in q.top..q.top + q.height {
                    for x in q.left..q.left + q.width {
                        let [r, g, b] = p.rgb.pixel(x, y);
                        if !(r == g && g == b) {
                            columns.push(x - q.left);
                        }
                    }
                }
                assert!(
                    columns.len() > 50,
                    "label {label}: {} coloured pixels",
                    columns.len()
                );
                let mid = q.width / 2;
                assert!(
                    columns.iter().all(|&c| (c > mid) == left_side),
                    "label {label}: coloured columns {:?}..{:?} of {}",
                    columns.iter().min(),
                    columns.iter().max(),
                    q.width
                );
            }
            // Superior is up: the precentral gyrus is in the upper half of the coronal panel.
            let c = p.panels[1];
            let rows = (c.top..c.top + c.height).filter(|&y| {
                (c.left..c.left + c.width).any(|x| {
                    let [r, g, b] = p.rgb.pixel(x, y);
                    !(r == g && g == b)
                })
            });
            assert!(
                rows.into_iter().all(|y| y - c.top < c.height / 2),
                "label {label}"
            );
        }
    }
}
