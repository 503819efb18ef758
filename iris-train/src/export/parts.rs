//! The three graphs: encoder, task encoder, decoder (with the classifier
//! head). Input and output names and shapes follow the ONNX contract (see
//! [`super`]); parameter initializers are named by their path in [`Iris`].

use super::graph::{Dim, Graph, attr_int, int};
use super::layers::{
    Context, add, basic_block, block_stack, channel_norm, conv, cross_attention,
    default_layer_norm, feed_forward, foreground_mean, max_pool_2x, mlp, norm_relu_conv,
    norm_relu_conv_channel, pixel_shuffle, pixel_unshuffle, reshape, reshape_after, self_attention,
    shape_of, shape_with, transpose, unsqueeze, upsample_2x,
};
use crate::Error;
use crate::model::decoder::FusionLayer;
use crate::model::task_encoder::{TaskEncoderStage, TaskQueryBlock};
use crate::model::{Iris, IrisConfig};
use tract_onnx::pb::ModelProto;

const BATCH: Dim = Dim::Named("batch");
const CLASSES: Dim = Dim::Named("classes");

/// The model's sizes as the graphs need them.
struct Sizes {
    channels: [usize; 5],
    patch: [usize; 3],
    stages: usize,
    /// `T + 1` tokens per class and task stage.
    tokens: usize,
}

impl Sizes {
    fn new(config: &IrisConfig) -> Self {
        Sizes {
            channels: config.channels,
            patch: config.patch_size,
            stages: config.task_stages,
            tokens: config.query_tokens + 1,
        }
    }

    /// Spatial size `[D, H, W]` of level `l` (`patch / 2^l`).
    fn spatial(&self, level: usize) -> [usize; 3] {
        self.patch.map(|s| s >> level)
    }

    /// `[batch, C_l, D_l, H_l, W_l]`.
    fn features_dims(&self, level: usize) -> [Dim; 5] {
        let [d, h, w] = self.spatial(level).map(Dim::Fixed);
        [BATCH, Dim::Fixed(self.channels[level]), d, h, w]
    }

    /// `[batch, classes, T + 1, C_{4 - s}]` of task stage `s` (deepest
    /// first).
    fn task_dims(&self, stage: usize) -> [Dim; 4] {
        [
            BATCH,
            CLASSES,
            Dim::Fixed(self.tokens),
            Dim::Fixed(self.channels[4 - stage]),
        ]
    }

    /// `[batch, classes, D, H, W]` (masks, logits).
    fn per_class_dims(&self) -> [Dim; 5] {
        let [d, h, w] = self.patch.map(Dim::Fixed);
        [BATCH, CLASSES, d, h, w]
    }

    /// The levels the task stages read, as `(stage, level)`, deepest first.
    fn task_levels(&self) -> impl Iterator<Item = (usize, usize)> {
        (0..self.stages).map(|s| (s, 4 - s))
    }
}

/// `encoder.onnx`: `image` `[batch, 1, D, H, W]` to `features_0` ..
/// `features_4`.
pub(crate) fn encoder(model: &Iris, config: &IrisConfig) -> Result<ModelProto, Error> {
    let sizes = Sizes::new(config);
    let encoder = &model.encoder;
    let mut g = Graph::new("iris_encoder");
    let [d, h, w] = sizes.patch.map(Dim::Fixed);
    let image = g.input("image", &[BATCH, Dim::Fixed(1), d, h, w]);
    let stem = conv(
        &mut g,
        "encoder.stem",
        encoder.stem.weight.val(),
        None,
        &image,
    )?;
    let mut x = basic_block(&mut g, "encoder.stem_block", &encoder.stem_block, &stem)?;
    for (level, stage) in encoder.stages.iter().enumerate() {
        g.output(
            &x,
            &format!("features_{level}"),
            &sizes.features_dims(level),
        );
        let pooled = max_pool_2x(&mut g, &x);
        x = block_stack(&mut g, &format!("encoder.stages.{level}"), stage, &pooled)?;
    }
    g.output(&x, "features_4", &sizes.features_dims(4));
    Ok(g.into_model())
}

/// `task_encoder.onnx`: `features_{5-S}` .. `features_4` and `masks`
/// `[batch, classes, D, H, W]` to `task_0` .. `task_{S-1}`.
pub(crate) fn task_encoder(model: &Iris, config: &IrisConfig) -> Result<ModelProto, Error> {
    let sizes = Sizes::new(config);
    let mut g = Graph::new("iris_task_encoder");
    let mut features = vec![String::new(); 5];
    for (level, slot) in features.iter_mut().enumerate().skip(5 - sizes.stages) {
        *slot = g.input(&format!("features_{level}"), &sizes.features_dims(level));
    }
    let masks = g.input("masks", &sizes.per_class_dims());
    let batch_classes = shape_of(&mut g, &masks, 0, 2);
    for ((s, level), stage) in sizes.task_levels().zip(&model.task_encoder.stages) {
        let tokens = task_stage(
            &mut g,
            &format!("task_encoder.stages.{s}"),
            stage,
            &sizes,
            level,
            [&features[level], &masks, &batch_classes],
        )?;
        g.output(&tokens, &format!("task_{s}"), &sizes.task_dims(s));
    }
    Ok(g.into_model())
}

/// One [`TaskEncoderStage`] at `level`: the foreground token, the context
/// tokens and the query attention blocks (see the stage's `forward`).
///
/// `[features, masks, batch_classes]`: the level's features `[B, C, d, h,
/// w]`, the masks `[B, K, D, H, W]` and the 1-D value `[B, K]`. Output
/// `[B, K, T + 1, C]`.
fn task_stage(
    g: &mut Graph,
    name: &str,
    stage: &TaskEncoderStage,
    sizes: &Sizes,
    level: usize,
    [features, masks, batch_classes]: [&str; 3],
) -> Result<String, Error> {
    let c = sizes.channels[level];
    let low = sizes.spatial(level);
    let [dd, hh, ww] = sizes.patch;
    let s = stage.scale;
    let voxels = int(low.iter().product());
    let cc = int(c);
    let foreground = foreground_mean(g, name, features, c, masks, low, sizes.patch);

    // Context tokens: the merge unit reads the shuffled features (shared by
    // all classes) and each mask, `[B * K, 2, D, H, W]` in the model. As the
    // sum of its two input channels' parts, the features' part (with the
    // bias and the position) is computed once; each class convolves only
    // its mask.
    let shared = norm_relu_conv(
        g,
        &format!("{name}.expand"),
        &stage.expand_norm,
        &stage.expand,
        features,
    )?;
    let shared = pixel_shuffle(g, &shared, 1, low, s);
    let merge = format!("{name}.merge");
    let shared = norm_relu_conv_channel(
        g,
        &merge,
        &stage.merge_norm,
        (&stage.merge, 0, true),
        &shared,
    )?;
    let position = stage
        .position
        .val()
        .slice([0..1, 0..1, 0..dd, 0..hh, 0..ww]);
    let position = g.weight(&format!("{name}.position"), position)?;
    let shared = add(g, &shared, &position);
    let per_class = reshape(g, masks, &[-1, 1, int(dd), int(hh), int(ww)]);
    let per_class = norm_relu_conv_channel(
        g,
        &merge,
        &stage.merge_norm,
        (&stage.merge, 1, false),
        &per_class,
    )?;
    let per_class = reshape_after(g, &per_class, batch_classes, &[int(dd), int(hh), int(ww)]);
    let merged = add(g, &per_class, &shared);
    let merged = reshape(g, &merged, &[-1, 1, int(dd), int(hh), int(ww)]);
    let merged = pixel_unshuffle(g, &merged, 1, low, s);
    let merged = norm_relu_conv(
        g,
        &format!("{name}.squeeze"),
        &stage.squeeze_norm,
        &stage.squeeze,
        &merged,
    )?;
    let merged = reshape_after(g, &merged, batch_classes, &[cc, voxels]);
    let residual = reshape(g, features, &[0, 1, cc, voxels]);
    let context = add(g, &merged, &residual);
    let context = reshape(g, &context, &[-1, cc, voxels]);
    // Normalised once for all the stage's cross-attentions (each folds its
    // own scale and shift into its weights).
    let context = channel_norm(g, &context);

    // Query tokens: T learnable queries, then the foreground token.
    let [t, _] = stage.queries.dims();
    let queries = g.weight(&format!("{name}.queries"), stage.queries.val())?;
    let queries = default_layer_norm(
        g,
        &format!("{name}.norm_query"),
        &stage.norm_query,
        &queries,
    )?;
    let foreground = reshape(g, &foreground, &[-1, 1, cc]);
    let foreground = default_layer_norm(
        g,
        &format!("{name}.norm_foreground"),
        &stage.norm_foreground,
        &foreground,
    )?;
    let queries = unsqueeze(g, &queries, &[0]);
    let count = shape_of(g, &foreground, 0, 1);
    let queries_shape = shape_with(g, &count, &[int(t), cc]);
    let queries = g.op("Expand", &[&queries, &queries_shape], vec![]);
    let tokens = g.op(
        "Concat",
        &[&queries, &foreground],
        vec![attr_int("axis", 1)],
    );
    let mut tokens = default_layer_norm(
        g,
        &format!("{name}.norm_combined"),
        &stage.norm_combined,
        &tokens,
    )?;
    for (i, block) in stage.blocks.iter().enumerate() {
        tokens = query_block(g, &format!("{name}.blocks.{i}"), block, &tokens, &context)?;
    }
    let tokens = default_layer_norm(g, &format!("{name}.norm_post"), &stage.norm_post, &tokens)?;
    Ok(reshape_after(g, &tokens, batch_classes, &[int(t + 1), cc]))
}

/// A [`TaskQueryBlock`]: self-attention, cross-attention to `context` (the
/// stage's normalised voxels `[N, C, T]`, see [`channel_norm`]),
/// self-attention, each followed by a feed-forward unit.
fn query_block(
    g: &mut Graph,
    name: &str,
    block: &TaskQueryBlock,
    x: &str,
    context: &str,
) -> Result<String, Error> {
    let x = self_attention(
        g,
        &format!("{name}.self_attention_1"),
        &block.self_attention_1,
        x,
    )?;
    let x = feed_forward(
        g,
        &format!("{name}.feed_forward_1"),
        &block.feed_forward_1,
        &x,
    )?;
    // T + 1 queries against a level's voxels: the folded form.
    let x = cross_attention(
        g,
        &format!("{name}.cross_attention"),
        &block.cross_attention,
        &x,
        Context::NormalisedVoxels(context),
    )?;
    let x = feed_forward(
        g,
        &format!("{name}.feed_forward_cross"),
        &block.feed_forward_cross,
        &x,
    )?;
    let x = self_attention(
        g,
        &format!("{name}.self_attention_2"),
        &block.self_attention_2,
        &x,
    )?;
    feed_forward(
        g,
        &format!("{name}.feed_forward_2"),
        &block.feed_forward_2,
        &x,
    )
}

/// `decoder.onnx`: `features_0` .. `features_4` and `task_0` ..
/// `task_{S-1}` to `logits` `[batch, classes, D, H, W]`.
pub(crate) fn decoder(model: &Iris, config: &IrisConfig) -> Result<ModelProto, Error> {
    let sizes = Sizes::new(config);
    let decoder = &model.decoder;
    let mut g = Graph::new("iris_decoder");
    let features: Vec<String> = (0..5)
        .map(|level| g.input(&format!("features_{level}"), &sizes.features_dims(level)))
        .collect();
    let tasks: Vec<String> = (0..sizes.stages)
        .map(|s| g.input(&format!("task_{s}"), &sizes.task_dims(s)))
        .collect();

    let mut x = features[4].clone();
    let mut summaries = Vec::with_capacity(sizes.stages);
    for level in (0..5).rev() {
        if level < 4 {
            let up = 3 - level;
            let upsampled = upsample_2x(&mut g, &x);
            let joined = g.op(
                "Concat",
                &[&features[level], &upsampled],
                vec![attr_int("axis", 1)],
            );
            x = block_stack(
                &mut g,
                &format!("decoder.ups.{up}.blocks"),
                &decoder.ups[up].blocks,
                &joined,
            )?;
        }
        let stage = 4 - level;
        if let (Some(fusion), Some(tokens)) = (decoder.fusions.get(stage), tasks.get(stage)) {
            let (fused, tokens) = fusion_layer(
                &mut g,
                &format!("decoder.fusions.{stage}"),
                fusion,
                &sizes,
                level,
                [&x, tokens],
            )?;
            x = fused;
            let first = g.scalar_int("token_0", 0);
            summaries.push(g.op("Gather", &[&tokens, &first], vec![attr_int("axis", 2)]));
        }
    }

    // Classifier head: per-class weights `[B, K, C_0]` dotted with the
    // full-resolution features.
    let head = &model.head;
    let summaries: Vec<&str> = summaries.iter().map(String::as_str).collect();
    let joined = g.op("Concat", &summaries, vec![attr_int("axis", 2)]);
    let y = default_layer_norm(&mut g, "head.norm", &head.norm, &joined)?;
    let y = mlp(&mut g, "head.mlp_1", &head.mlp_1, &y)?;
    let weights = mlp(&mut g, "head.mlp_2", &head.mlp_2, &y)?;
    let [d, h, w] = sizes.patch.map(int);
    let x = reshape(&mut g, &x, &[0, int(sizes.channels[0]), d * h * w]);
    let logits = g.op("MatMul", &[&weights, &x], vec![]);
    let logits = reshape(&mut g, &logits, &[0, -1, d, h, w]);
    g.output(&logits, "logits", &sizes.per_class_dims());
    Ok(g.into_model())
}

/// A [`FusionLayer`] at `level`: `[x, tokens]` (`[B, C, d, h, w]` and
/// `[B, K, T + 1, C]`) to the fused pair of the same shapes.
fn fusion_layer(
    g: &mut Graph,
    name: &str,
    layer: &FusionLayer,
    sizes: &Sizes,
    level: usize,
    [x, tokens]: [&str; 2],
) -> Result<(String, String), Error> {
    let c = int(sizes.channels[level]);
    let [d, h, w] = sizes.spatial(level).map(int);
    let image = reshape(g, x, &[0, c, d * h * w]);
    let mut image = transpose(g, &image, &[0, 2, 1]);
    let mut tokens = reshape(g, tokens, &[0, -1, c]);
    for (i, block) in layer.blocks.iter().enumerate() {
        let name = format!("{name}.blocks.{i}");
        // K (T + 1) queries, as many as the classes: the textbook form.
        tokens = cross_attention(
            g,
            &format!("{name}.tokens_read_image"),
            &block.tokens_read_image,
            &tokens,
            Context::Tokens(&image),
        )?;
        tokens = feed_forward(
            g,
            &format!("{name}.tokens_feed_forward"),
            &block.tokens_feed_forward,
            &tokens,
        )?;
        image = cross_attention(
            g,
            &format!("{name}.image_read_tokens"),
            &block.image_read_tokens,
            &image,
            Context::Tokens(&tokens),
        )?;
        image = feed_forward(
            g,
            &format!("{name}.image_feed_forward"),
            &block.image_feed_forward,
            &image,
        )?;
        tokens = self_attention(
            g,
            &format!("{name}.tokens_self_attention"),
            &block.tokens_self_attention,
            &tokens,
        )?;
        tokens = feed_forward(
            g,
            &format!("{name}.tokens_feed_forward_2"),
            &block.tokens_feed_forward_2,
            &tokens,
        )?;
    }
    let image = transpose(g, &image, &[0, 2, 1]);
    let x = reshape(g, &image, &[0, c, d, h, w]);
    let tokens = reshape(g, &tokens, &[0, -1, int(sizes.tokens), c]);
    Ok((x, tokens))
}
