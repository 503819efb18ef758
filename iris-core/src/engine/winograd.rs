//! The 3x3x3 convolution by Winograd's minimal filtering, F(2x2x2, 3x3x3).
//!
//! A direct 3x3x3 convolution spends 27 multiply-adds per input channel,
//! output channel and output voxel. Winograd's F(2, 3) computes two outputs
//! of a 3-tap filter from four inputs with four products instead of six
//! (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks",
//! CVPR 2016); nested along the three axes, a 2x2x2 output tile takes
//! 4x4x4 = 64 products per channel pair instead of 8 x 27 = 216, 3.4 times
//! fewer. The transforms that surround the products are additions only:
//!
//! - each 4x4x4 input tile `d` becomes `V = Bᵀ d B` along every axis, once
//!   per input channel;
//! - each kernel `g` becomes `U = G g Gᵀ` along every axis, once, when the
//!   op is made;
//! - for each of the 64 tile positions `t`, `M[t] = U[t] · V[t]` is a matrix
//!   product over the input channels (output channels by tiles), the work
//!   that stays;
//! - each output tile is `Aᵀ M A` along every axis, plus the bias.
//!
//! The tiles of one depth pair are taken [`TILES`] at a time, so that a
//! block's transformed inputs and products stay in the core's caches;
//! depth pairs run in parallel on the model's thread pool. The products'
//! register block is the direct kernel's (eight output channels by two
//! vectors of 16 tiles, the weight broadcast). Every transform entry is 0,
//! ±1 or ±1/2, so F(2, 3) adds little rounding: results differ from the
//! direct sum by about 1e-6 relative (the unit test bounds them at 1e-5).
//!
//! In [`Precision::Bfloat16`] the products take both operands rounded to
//! bfloat16, two input channels per 32-bit lane, and sum them in f32 with
//! AVX-512 BF16's pair dot product (`vdpbf16ps`): twice the multiply-adds
//! of an f32 FMA per instruction. The transforms stay f32.

use std::prelude::rust_2024::*;
use std::vec;

use super::Precision;
use super::parallel::{self, SharedOut};

/// Tiles one block transforms and multiplies: the columns of the
/// products' register block, two vectors of 16.
const TILES: usize = super::products::TILE;
/// Output channels per register block of the products.
const BLOCK: usize = super::products::BLOCK;
/// Input channels ahead of the one being transformed whose rows are
/// prefetched.
const PREFETCH: usize = 2;
/// Transformed values per tile: 4 x 4 x 4.
const POSITIONS: usize = 64;
/// Floats between two positions' blocks of rows in the transformed inputs
/// and the products: their rows (`TILES` floats each), plus one cache
/// line. Without the extra line, 32 or 64 rows make a multiple of 4 KiB,
/// so the 64 values of one tile fell in one set of the first-level cache
/// and evicted each other.
fn position_stride(rows: usize) -> usize {
    rows * TILES + 16
}

/// A 3x3x3 convolution's weights in Winograd form, and the convolution.
#[derive(Debug)]
pub(crate) struct Winograd {
    input_channels: usize,
    output_channels: usize,
    /// `U = G g Gᵀ` of every kernel.
    weights: Weights,
}

/// The transformed weights in the products' arithmetic.
#[derive(Debug)]
enum Weights {
    /// `[64][Cout / BLOCK][Cin][BLOCK]`, zero past `Cout`.
    Float32(Vec<f32>),
    /// bfloat16, the values of input channels `2p` and `2p + 1` in one
    /// `u32` (the even one in the low half), as `[64][Cout / BLOCK][Cin /
    /// 2][BLOCK]`, zero past `Cout` and `Cin`.
    Bfloat16(Vec<u32>),
}

/// The bfloat16 nearest to `value` (ties to even), in the low half.
fn bfloat16(value: f32) -> u32 {
    let bits = value.to_bits();
    if value.is_nan() {
        return (bits >> 16) | 0x40;
    }
    (bits + 0x7fff + ((bits >> 16) & 1)) >> 16
}

/// Where a convolution's output channels go: channels `0..split` to the
/// first buffer (`[split, D, H, W]`), the others to the second, added to
/// what they hold where `accumulate`.
#[derive(Clone, Copy)]
struct Outputs<'a> {
    buffers: [SharedOut<'a>; 2],
    split: usize,
    accumulate: bool,
}

/// One run of tiles of a block: output tile row `ty` of the depth pair,
/// tiles `tx0..tx1` along W, lanes `lane..` of the block.
#[derive(Clone, Copy)]
struct Run {
    tz: usize,
    ty: usize,
    tx0: usize,
    tx1: usize,
    lane: usize,
}

impl Winograd {
    /// The transformed weights of `kernel` (`[Cout, Cin, 3, 3, 3]`), for
    /// products in `precision` where this CPU runs it, else in f32.
    pub(crate) fn new(kernel: &[f32], [cin, cout]: [usize; 2], precision: Precision) -> Self {
        let blocks = cout.div_ceil(BLOCK);
        let mut weights = vec![0.0; POSITIONS * blocks * cin * BLOCK];
        // In the order of `weights` within each position, so that the 64
        // positions are 64 streams of consecutive writes.
        for (block, ci) in (0..blocks).flat_map(|b| (0..cin).map(move |ci| (b, ci))) {
            for co in block * BLOCK..(block * BLOCK + BLOCK).min(cout) {
                let u = transform_kernel(&kernel[(co * cin + ci) * 27..][..27]);
                for (t, &u) in u.iter().enumerate() {
                    weights[((t * blocks + block) * cin + ci) * BLOCK + co % BLOCK] = u as f32;
                }
            }
        }
        let weights = match precision.on_this_cpu() {
            Precision::Float32 => Weights::Float32(weights),
            Precision::Bfloat16 => {
                // Pairs of input channels: `[64][blocks][Cin / 2][BLOCK]`.
                let pairs = cin.div_ceil(2);
                let mut packed = vec![0; POSITIONS * blocks * pairs * BLOCK];
                for (i, pair) in packed.iter_mut().enumerate() {
                    let (lane, p, tb) = (i % BLOCK, i / BLOCK % pairs, i / BLOCK / pairs);
                    let value = |ci: usize| {
                        (ci < cin).then(|| bfloat16(weights[(tb * cin + ci) * BLOCK + lane]))
                    };
                    *pair = value(2 * p).unwrap_or(0) | value(2 * p + 1).unwrap_or(0) << 16;
                }
                Weights::Bfloat16(packed)
            }
        };
        Winograd {
            input_channels: cin,
            output_channels: cout,
            weights,
        }
    }

    /// The arithmetic of the products.
    pub(crate) fn precision(&self) -> Precision {
        match self.weights {
            Weights::Float32(_) => Precision::Float32,
            Weights::Bfloat16(_) => Precision::Bfloat16,
        }
    }

    /// Whether the tiles cover a volume of `[d, h, w]`: every side even.
    pub(crate) fn serves([d, h, w]: [usize; 3]) -> bool {
        [d, h, w].iter().all(|&n| n > 0 && n % 2 == 0)
    }

    /// The convolution of one sample, `input` (`[Cin, D, H, W]`, C order),
    /// plus `bias` (`[Cout]`), into `first` then `second` (`[C, D, H, W]`
    /// each, the output channels in order: `second` holds those past
    /// `first`'s, and is empty for one output), added to what they hold
    /// where `accumulate`. The sides must be even ([`Winograd::serves`]);
    /// the CPU must have AVX-512F.
    pub(crate) fn run(
        &self,
        input: &[f32],
        bias: &[f32],
        [d, h, w]: [usize; 3],
        [first, second]: [&mut [f32]; 2],
        accumulate: bool,
    ) {
        assert!(Winograd::serves([d, h, w]), "odd sides {:?}", [d, h, w]);
        let (cin, cout, voxels) = (self.input_channels, self.output_channels, d * h * w);
        assert_eq!(input.len(), cin * voxels, "input size");
        assert_eq!(first.len() + second.len(), cout * voxels, "output size");
        assert_eq!(first.len() % voxels, 0, "first output size");
        assert_eq!(bias.len(), cout, "bias size");
        let split = first.len() / voxels;
        let outputs = Outputs {
            buffers: [SharedOut::new(first), SharedOut::new(second)],
            split,
            accumulate,
        };
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("the convolution's own kernels run only where `conv3d::available()`");
        #[cfg(target_arch = "x86_64")]
        self.run_tiles(input, bias, [d, h, w], outputs);
    }

    /// [`Winograd::run`] once its sizes are checked: the depth pairs in
    /// parallel, each thread with its own scratch.
    #[cfg(target_arch = "x86_64")]
    fn run_tiles(&self, input: &[f32], bias: &[f32], [d, h, w]: [usize; 3], outputs: Outputs<'_>) {
        use avx512::{products, products_bf16, transform_input, transform_output};
        let cin = self.input_channels;
        let (ty_n, tx_n) = (h / 2, w / 2);
        let padded = self.output_channels.div_ceil(BLOCK) * BLOCK;
        // Scratch for one thread: transformed inputs, products, runs, and
        // one position's inputs as bfloat16 pairs.
        let scratch = || {
            let v = vec![0.0f32; POSITIONS * position_stride(cin)];
            let m = vec![0.0f32; POSITIONS * position_stride(padded)];
            let pairs = match self.weights {
                Weights::Float32(_) => Vec::new(),
                Weights::Bfloat16(_) => vec![0u32; cin.div_ceil(2) * TILES],
            };
            (v, m, Vec::new(), pairs)
        };
        type Scratch = (Vec<f32>, Vec<f32>, Vec<Run>, Vec<u32>);
        let pair = |(v, m, runs, pairs): &mut Scratch, tz: usize| {
            for start in (0..ty_n * tx_n).step_by(TILES) {
                // The block's tiles, one run per tile row.
                runs.clear();
                let end = (start + TILES).min(ty_n * tx_n);
                let mut tile = start;
                while tile < end {
                    let (ty, tx0) = (tile / tx_n, tile % tx_n);
                    let tx1 = (tx0 + end - tile).min(tx_n);
                    runs.push(Run {
                        tz,
                        ty,
                        tx0,
                        tx1,
                        lane: tile - start,
                    });
                    tile += tx1 - tx0;
                }
                // SAFETY: `run`'s callers hold AVX-512F (the op is made
                // only where `conv3d::available()`), and AVX-512 BF16
                // where the weights are bfloat16 (`Precision::on_this_cpu`);
                // the outputs hold `Cout * D * H * W` values and this depth
                // pair writes only its own two depth slices of them.
                unsafe {
                    for &run in runs.iter() {
                        transform_input(input, [d, h, w], cin, run, v);
                    }
                    match &self.weights {
                        Weights::Float32(u) => products(u, v, m, cin, padded / BLOCK),
                        Weights::Bfloat16(u) => products_bf16(u, v, pairs, m, cin, padded / BLOCK),
                    }
                    for &run in runs.iter() {
                        transform_output((m, padded), [d, h, w], bias, run, outputs);
                    }
                }
            }
        };
        parallel::for_each_with(d / 2, scratch, pair);
    }
}

/// `U = G g Gᵀ` along the three axes of one 3x3x3 kernel (`[z][y][x]`),
/// in f64, one axis at a time.
fn transform_kernel(g: &[f32]) -> [f64; POSITIONS] {
    const G: [[f64; 3]; 4] = [
        [1.0, 0.0, 0.0],
        [0.5, 0.5, 0.5],
        [0.5, -0.5, 0.5],
        [0.0, 0.0, 1.0],
    ];
    let along = |v: [f64; 3]| G.map(|row| row[0] * v[0] + row[1] * v[1] + row[2] * v[2]);
    // Along x: `[3 z][3 y][4 kx]`; along y: `[3 z][4 ky][4 kx]`.
    let x: [[[f64; 4]; 3]; 3] = core::array::from_fn(|z| {
        core::array::from_fn(|y| along(core::array::from_fn(|x| f64::from(g[z * 9 + y * 3 + x]))))
    });
    let xy: [[[f64; 4]; 4]; 3] = core::array::from_fn(|z| {
        let columns: [[f64; 4]; 4] =
            core::array::from_fn(|kx| along([x[z][0][kx], x[z][1][kx], x[z][2][kx]]));
        core::array::from_fn(|ky| core::array::from_fn(|kx| columns[kx][ky]))
    });
    let mut u = [0.0; POSITIONS];
    for (ky, kx) in (0..4).flat_map(|ky| (0..4).map(move |kx| (ky, kx))) {
        let column = along([xy[0][ky][kx], xy[1][ky][kx], xy[2][ky][kx]]);
        for (kz, &value) in column.iter().enumerate() {
            u[kz * 16 + ky * 4 + kx] = value;
        }
    }
    u
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::super::products::avx512::accumulate;
    use super::{BLOCK, Outputs, POSITIONS, PREFETCH, Run, TILES, position_stride};

    /// A mask of lanes `0..n` (at most 16).
    fn lanes(n: usize) -> __mmask16 {
        ((1u32 << n.min(16)) - 1) as __mmask16
    }

    /// `Bᵀ d` for F(2, 3): the four inputs of two outputs, transformed.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn b_t([d0, d1, d2, d3]: [__m512; 4]) -> [__m512; 4] {
        [
            _mm512_sub_ps(d0, d2),
            _mm512_add_ps(d1, d2),
            _mm512_sub_ps(d2, d1),
            _mm512_sub_ps(d1, d3),
        ]
    }

    /// `Aᵀ m` for F(2, 3): two outputs from four products.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn a_t([m0, m1, m2, m3]: [__m512; 4]) -> [__m512; 2] {
        [
            _mm512_add_ps(_mm512_add_ps(m0, m1), m2),
            _mm512_sub_ps(_mm512_sub_ps(m1, m2), m3),
        ]
    }

    /// The first `count` (at most 16) values of `values`, zero past them.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn load_lanes(values: &[f32], count: usize) -> __m512 {
        let values = &values[..count];
        // SAFETY: the mask reads the `count` values of `values`.
        unsafe { _mm512_maskz_loadu_ps(lanes(count), values.as_ptr()) }
    }

    /// Transforms the input tiles of `run` (`Bᵀ d B` along every axis) for
    /// every input channel of `input` (`[Cin, D, H, W]`) into `v`
    /// (`[64][Cin][TILES]`, positions `position_stride(Cin)` apart; lanes
    /// `run.lane..`), 16 tiles per vector.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    // The loops walk one axis of tiles indexed on three.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transform_input(
        input: &[f32],
        [d, h, w]: [usize; 3],
        cin: usize,
        run: Run,
        v: &mut [f32],
    ) {
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        let n = run.tx1 - run.tx0;
        // The 4x4 rows the run's tiles read, as offsets in a channel; rows
        // outside the volume are read as zeros (empty masks).
        let mut rows = [[(0usize, true); 4]; 4];
        for (a, rows) in rows.iter_mut().enumerate() {
            for (b, row) in rows.iter_mut().enumerate() {
                let z = (2 * run.tz + a).checked_sub(1).filter(|&z| z < d);
                let y = (2 * run.ty + b).checked_sub(1).filter(|&y| y < h);
                *row = match (z, y) {
                    (Some(z), Some(y)) => ((z * h + y) * w, true),
                    _ => (0, false),
                };
            }
        }
        for group in 0..n.div_ceil(16) {
            let count = (n - 16 * group).min(16);
            // Tile i of the group reads x = start + 2i .. start + 2i + 4; the
            // four loads below start at start + k, their masks keep x in
            // 0..W.
            let start = 2 * (run.tx0 + 16 * group) as isize - 1;
            let offsets = [0, 16, 2, 18].map(|k| start + k);
            let masks = offsets.map(|at| {
                let below = (-at).clamp(0, 16) as usize;
                let inside = (w as isize - at).clamp(0, 16) as usize;
                lanes(inside) & !lanes(below)
            });
            for ci in 0..cin {
                let channel = &input[ci * d * h * w..][..d * h * w];
                // The rows are far apart (a plane between depths, a
                // channel between channels), too many streams for the
                // hardware prefetcher: ask for those of the channel after
                // next now.
                if ci + PREFETCH < cin {
                    let ahead = &input[(ci + PREFETCH) * d * h * w..][..d * h * w];
                    for &(row, inside) in rows.iter().flatten() {
                        if !inside {
                            continue;
                        }
                        let row = &ahead[row..][..w];
                        for line in [0, 16, 32] {
                            let at = (start + line).clamp(0, w as isize - 1) as usize;
                            _mm_prefetch::<_MM_HINT_T0>(row[at..].as_ptr().cast());
                        }
                    }
                }
                // `x[a][b][kx]`: row (a, b) of the 16 tiles' 4x4 rows,
                // transformed along x.
                let mut x = [[[_mm512_setzero_ps(); 4]; 4]; 4];
                for (x, rows) in x.iter_mut().zip(&rows) {
                    for (x, &(row, inside)) in x.iter_mut().zip(rows) {
                        let row = &channel[row..][..w];
                        let [p0, p1, q0, q1] = [0, 1, 2, 3].map(|k| {
                            let mask = if inside { masks[k] } else { 0 };
                            // SAFETY: the mask keeps the lanes at x in
                            // 0..W, inside `row`; the others are not read
                            // (the pointer itself may lie outside, hence
                            // `wrapping_offset`).
                            unsafe {
                                _mm512_maskz_loadu_ps(
                                    mask,
                                    row.as_ptr().wrapping_offset(offsets[k]),
                                )
                            }
                        });
                        // Tile i's four values: the even and odd positions
                        // of the group's values from 2i, and from 2i + 2.
                        *x = b_t([
                            _mm512_permutex2var_ps(p0, even, p1),
                            _mm512_permutex2var_ps(p0, odd, p1),
                            _mm512_permutex2var_ps(q0, even, q1),
                            _mm512_permutex2var_ps(q0, odd, q1),
                        ]);
                    }
                }
                // Along y, then z, into `v`.
                for kx in 0..4 {
                    let xy: [[__m512; 4]; 4] = core::array::from_fn(|a| {
                        b_t([x[a][0][kx], x[a][1][kx], x[a][2][kx], x[a][3][kx]])
                    });
                    for ky in 0..4 {
                        let t = b_t([xy[0][ky], xy[1][ky], xy[2][ky], xy[3][ky]]);
                        for (kz, &t) in t.iter().enumerate() {
                            let position = kz * 16 + ky * 4 + kx;
                            let lanes_at = position * position_stride(cin)
                                + ci * TILES
                                + run.lane
                                + 16 * group;
                            let dst = &mut v[lanes_at..][..count];
                            // SAFETY: the mask writes the `count` values
                            // of `dst`.
                            unsafe { _mm512_mask_storeu_ps(dst.as_mut_ptr(), lanes(count), t) };
                        }
                    }
                }
            }
        }
    }

    /// Transforms the products of `run`'s tiles (`m`: `[64][padded][TILES]`,
    /// `padded` being `Cout` rounded up to [`BLOCK`]) back into output
    /// tiles (`Aᵀ M A` along every axis), adds the bias, and stores them in
    /// `outputs`.
    ///
    /// # Safety
    /// The CPU has AVX-512F; the outputs hold `Cout * D * H * W` values
    /// (split as `outputs.split` says), of which no other thread touches
    /// depth slices `2 run.tz` and `2 run.tz + 1`.
    // The loops walk one axis of tiles indexed on three.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transform_output(
        (m, padded): (&[f32], usize),
        [d, h, w]: [usize; 3],
        bias: &[f32],
        run: Run,
        outputs: Outputs<'_>,
    ) {
        // Lanes of two 16-tile vectors (outputs x = 2i and 2i + 1),
        // interleaved into positions along the row.
        let low = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        let high = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        let n = run.tx1 - run.tx0;
        let accumulate = outputs.accumulate;
        for (co, &bias) in bias.iter().enumerate() {
            let bias = _mm512_set1_ps(bias);
            let (out, channel) = match co.checked_sub(outputs.split) {
                None => (outputs.buffers[0], co),
                Some(channel) => (outputs.buffers[1], channel),
            };
            for group in 0..n.div_ceil(16) {
                let count = (n - 16 * group).min(16);
                // Along x, then y, one depth of the tile at a time:
                // `s[kz][oy][ox]`. Plain loops: a closure (`from_fn`,
                // `map`) would be called, not inlined, from generic code
                // built without AVX-512, its vectors passed through memory.
                let mut s = [[[_mm512_setzero_ps(); 2]; 2]; 4];
                for (kz, plane) in s.iter_mut().enumerate() {
                    let mut r = [[_mm512_setzero_ps(); 2]; 4];
                    for (ky, r) in r.iter_mut().enumerate() {
                        let mut row = [_mm512_setzero_ps(); 4];
                        for (kx, value) in row.iter_mut().enumerate() {
                            let t = kz * 16 + ky * 4 + kx;
                            let lane =
                                t * position_stride(padded) + co * TILES + run.lane + 16 * group;
                            *value = load_lanes(&m[lane..], count);
                        }
                        *r = a_t(row);
                    }
                    for ox in 0..2 {
                        let [y0, y1] = a_t([r[0][ox], r[1][ox], r[2][ox], r[3][ox]]);
                        plane[0][ox] = y0;
                        plane[1][ox] = y1;
                    }
                }
                for oy in 0..2 {
                    // Along z: `z[ox][oz]`.
                    let z = [
                        a_t([s[0][oy][0], s[1][oy][0], s[2][oy][0], s[3][oy][0]]),
                        a_t([s[0][oy][1], s[1][oy][1], s[2][oy][1], s[3][oy][1]]),
                    ];
                    for oz in 0..2 {
                        let (even, odd) =
                            (_mm512_add_ps(z[0][oz], bias), _mm512_add_ps(z[1][oz], bias));
                        let (zi, yi) = (2 * run.tz + oz, 2 * run.ty + oy);
                        let start = ((channel * d + zi) * h + yi) * w + 2 * (run.tx0 + 16 * group);
                        // SAFETY: row (channel, zi, yi) lies inside `out` (zi <
                        // D, yi < H as the sides are even; the run's x <
                        // W), and only this thread writes depth slice zi.
                        let row = unsafe { out.slice(start, 2 * count) };
                        for (half, index) in [low, high].into_iter().enumerate() {
                            let mask = lanes((2 * count).saturating_sub(16 * half));
                            if mask == 0 {
                                continue;
                            }
                            let dst = row[16 * half..].as_mut_ptr();
                            let mut value = _mm512_permutex2var_ps(even, index, odd);
                            // SAFETY: the mask touches the row's values
                            // from 16 half on, inside `row`.
                            unsafe {
                                if accumulate {
                                    value = _mm512_add_ps(value, _mm512_maskz_loadu_ps(mask, dst));
                                }
                                _mm512_mask_storeu_ps(dst, mask, value);
                            }
                        }
                    }
                }
            }
        }
    }

    /// `m[t] = u[t] · v[t]` for the 64 positions: `u` `[64][blocks][Cin][BLOCK]`,
    /// `v` `[64][Cin][TILES]`, `m` `[64][blocks * BLOCK][TILES]` (positions
    /// `position_stride(rows)` apart).
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn products(u: &[f32], v: &[f32], m: &mut [f32], cin: usize, blocks: usize) {
        for t in 0..POSITIONS {
            let v = &v[t * position_stride(cin)..][..cin * TILES];
            for block in 0..blocks {
                let u = &u[(t * blocks + block) * cin * BLOCK..][..cin * BLOCK];
                let acc = accumulate([[_mm512_setzero_ps(); 2]; BLOCK], u, v);
                store(
                    &acc,
                    m,
                    t * position_stride(blocks * BLOCK) + block * BLOCK * TILES,
                );
            }
        }
    }

    /// [`products`] with bfloat16 weights `u` (`Weights::Bfloat16`): each
    /// position's inputs are rounded into `pairs` (`[Cin / 2][TILES][2]`
    /// bfloat16, the channels of a pair side by side per tile), then each
    /// block sums a pair of channels per step.
    ///
    /// # Safety
    /// The CPU has AVX-512F, AVX-512BW and AVX-512 BF16.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn products_bf16(
        u: &[u32],
        v: &[f32],
        pairs: &mut [u32],
        m: &mut [f32],
        cin: usize,
        blocks: usize,
    ) {
        let count = cin.div_ceil(2);
        let pairs = &mut pairs[..count * TILES];
        // `cvtne2ps_pbh(b, a)` puts `a`'s 16 values in the low half and
        // `b`'s in the high one; this interleaves them, a[0], b[0], a[1]..
        let interleave = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20,
            4, 19, 3, 18, 2, 17, 1, 16, 0,
        );
        for t in 0..POSITIONS {
            let v = &v[t * position_stride(cin)..][..cin * TILES];
            for (p, pair) in pairs.chunks_exact_mut(TILES).enumerate() {
                let even = &v[2 * p * TILES..][..TILES];
                // None past the last channel (an odd count).
                let odd = v.get((2 * p + 1) * TILES..(2 * p + 2) * TILES);
                for half in 0..2 {
                    // SAFETY: each row holds 32 values; `pair` 16 per half.
                    unsafe {
                        let a = _mm512_loadu_ps(even[16 * half..].as_ptr());
                        let b = odd.map_or(_mm512_setzero_ps(), |o| {
                            _mm512_loadu_ps(o[16 * half..].as_ptr())
                        });
                        let both =
                            core::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(b, a));
                        let both = _mm512_permutexvar_epi16(interleave, both);
                        _mm512_storeu_si512(pair[16 * half..].as_mut_ptr().cast(), both);
                    }
                }
            }
            for block in 0..blocks {
                let u = &u[(t * blocks + block) * count * BLOCK..][..count * BLOCK];
                let mut acc = [[_mm512_setzero_ps(); 2]; BLOCK];
                for (weights, x) in u.chunks_exact(BLOCK).zip(pairs.chunks_exact(TILES)) {
                    // SAFETY: `x` holds 32 u32, two vectors of 32 bfloat16.
                    let x = unsafe {
                        [
                            _mm512_loadu_si512(x.as_ptr().cast()),
                            _mm512_loadu_si512(x[16..].as_ptr().cast()),
                        ]
                    }
                    .map(bf16s);
                    for (acc, &weight) in acc.iter_mut().zip(weights) {
                        let weight = bf16s(_mm512_set1_epi32(weight as i32));
                        acc[0] = _mm512_dpbf16_ps(acc[0], weight, x[0]);
                        acc[1] = _mm512_dpbf16_ps(acc[1], weight, x[1]);
                    }
                }
                store(
                    &acc,
                    m,
                    t * position_stride(blocks * BLOCK) + block * BLOCK * TILES,
                );
            }
        }
    }

    /// The 32 bfloat16 that `bits` holds.
    #[inline]
    fn bf16s(bits: __m512i) -> __m512bh {
        // SAFETY: both are 512 bits, and any 16 bits are a bfloat16.
        unsafe { core::mem::transmute::<__m512i, __m512bh>(bits) }
    }

    /// One register block's sums into `m`, its rows `TILES` apart from
    /// `start`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn store(acc: &[[__m512; 2]; BLOCK], m: &mut [f32], start: usize) {
        for (row, acc) in m[start..][..BLOCK * TILES].chunks_exact_mut(TILES).zip(acc) {
            // SAFETY: `row` holds 32 values.
            unsafe {
                _mm512_storeu_ps(row.as_mut_ptr(), acc[0]);
                _mm512_storeu_ps(row[16..].as_mut_ptr(), acc[1]);
            }
        }
    }
}
