//! The model's sizes from a reference checkpoint: its `config` entry (the
//! training YAML as a dictionary) or, for a bare state_dict, its tensors.

use std::collections::HashMap;

use pytorch_reader::PickleValue;

use super::ImportOptions;
use crate::model::IrisConfig;

/// The architecture constants of the reference `Iris` class that have no
/// field in its `config` (`TaskEncodingLayer_SubPixel`, `MultiPriorFusionLayer`).
const REFERENCE_QUERY_TOKENS: usize = 10;
const REFERENCE_HEAD_DIM: usize = 32;
const REFERENCE_MLP_RATIO: usize = 4;
const REFERENCE_ATTENTION_BLOCKS: usize = 2;
/// The released spacing and window, for a bare state_dict.
const RELEASED_SPACING_MM: f64 = 1.5;
const RELEASED_WINDOW: usize = 128;

/// The model's sizes from the checkpoint's `config` entry (the training
/// YAML as a dictionary).
pub(super) fn config_from_entry(
    config: &HashMap<String, PickleValue>,
    options: &ImportOptions,
) -> Result<IrisConfig, String> {
    let Some(PickleValue::Dict(model)) = config.get("model") else {
        return Err("`config.model`: expected a dictionary of model settings, found none".into());
    };
    let field = |name: &str| model.get(name);
    if let Some(kind) = field("type") {
        expect_string(kind, "config.model.type", "iris")?;
    }
    if let Some(in_ch) = field("in_ch") {
        expect_ints(in_ch, "config.model.in_ch", 1, 1)?;
    }
    let channels = match (field("channels"), field("base_ch")) {
        (Some(value), _) if !matches!(value, PickleValue::None) => {
            let values = ints(value, "config.model.channels")?;
            <[usize; 5]>::try_from(values.clone()).map_err(|_| {
                format!("`config.model.channels`: expected 5 widths, found {values:?}")
            })?
        }
        (_, Some(base)) => {
            let base = ints(base, "config.model.base_ch")?;
            match base.as_slice() {
                [b] => [*b, 2 * b, 4 * b, 8 * b, 16 * b],
                _ => {
                    return Err(format!(
                        "`config.model.base_ch`: expected one width, found {base:?}"
                    ));
                }
            }
        }
        _ => return Err("`config.model.channels`: expected 5 widths, found none".into()),
    };
    if let Some(scale) = field("scale") {
        expect_ints(scale, "config.model.scale", 2, 4)?;
    }
    if let Some(kernel) = field("kernel_size") {
        expect_ints(kernel, "config.model.kernel_size", 3, 5)?;
    }
    if let Some(block) = field("block") {
        expect_string(block, "config.model.block", "BasicBlock")?;
    }
    if let Some(norm) = field("norm") {
        expect_string(norm, "config.model.norm", "in")?;
    }
    if let Some(pool) = field("pool")
        && pool != &PickleValue::Bool(true)
    {
        return Err(format!(
            "`config.model.pool`: expected true (max-pool downsampling), found {}",
            describe(pool)
        ));
    }
    let blocks = match field("num_block") {
        Some(value) => {
            let counts = ints(value, "config.model.num_block")?;
            match counts.as_slice() {
                [n, rest @ ..] if rest.iter().all(|m| m == n) && counts.len() == 4 && *n > 0 => *n,
                _ => {
                    return Err(format!(
                        "`config.model.num_block`: expected 4 equal positive counts, found {counts:?}"
                    ));
                }
            }
        }
        None => 2,
    };
    let task_stages = match field("num_prior_stage") {
        Some(value) => single_int(value, "config.model.num_prior_stage")?,
        None => 3,
    };
    let spacing_mm = match (options.spacing_mm, config.get("target_spacing")) {
        (Some(spacing), _) => spacing,
        (None, Some(value)) => {
            let spacing = floats(value, "config.target_spacing")?;
            match spacing.as_slice() {
                [s, rest @ ..] if rest.iter().all(|t| t == s) && spacing.len() == 3 => *s,
                _ => {
                    return Err(format!(
                        "`config.target_spacing`: expected an isotropic [z, y, x] spacing, found \
                         {spacing:?} (pass a spacing to resample to)"
                    ));
                }
            }
        }
        (None, None) => RELEASED_SPACING_MM,
    };
    let window = match options.window {
        Some(window) => window,
        None => {
            let evaluation = match config.get("evaluation") {
                Some(PickleValue::Dict(evaluation)) => evaluation.get("window_size"),
                _ => None,
            };
            match evaluation.or_else(|| config.get("training_size")) {
                Some(value) => {
                    let sizes = ints(value, "config.evaluation.window_size")?;
                    <[usize; 3]>::try_from(sizes.clone()).map_err(|_| {
                        format!(
                            "`config.evaluation.window_size`: expected [D, H, W], found {sizes:?}"
                        )
                    })?
                }
                None => [RELEASED_WINDOW; 3],
            }
        }
    };
    Ok(reference_config(
        channels,
        window,
        spacing_mm,
        blocks,
        task_stages,
    ))
}

/// The model's sizes read off a bare state_dict's tensors.
pub(super) fn config_from_tensors(
    tensors: &HashMap<String, pytorch_reader::Tensor>,
    options: &ImportOptions,
) -> Result<IrisConfig, String> {
    let width = |key: &str| {
        tensors
            .get(key)
            .and_then(|tensor| tensor.shape().first().copied())
            .ok_or_else(|| format!("`{key}`: missing (needed to size a bare state_dict)"))
    };
    let channels = [
        width("encoder.inc.conv1.weight")?,
        width("encoder.down1.conv.1.conv1.conv.weight")?,
        width("encoder.down2.conv.1.conv1.conv.weight")?,
        width("encoder.down3.conv.1.conv1.conv.weight")?,
        width("encoder.down4.conv.1.conv1.conv.weight")?,
    ];
    let blocks = (1..)
        .take_while(|j| tensors.contains_key(&format!("encoder.down1.conv.{j}.conv1.conv.weight")))
        .count();
    let task_stages = (0..)
        .take_while(|i| tensors.contains_key(&format!("task_embedding.{i}.task_query")))
        .count();
    if task_stages == 0 {
        return Err(
            "`task_embedding.0.task_query`: missing (needed to size a bare state_dict)".into(),
        );
    }
    let window = options.window.unwrap_or([RELEASED_WINDOW; 3]);
    let spacing_mm = options.spacing_mm.unwrap_or(RELEASED_SPACING_MM);
    Ok(reference_config(
        channels,
        window,
        spacing_mm,
        blocks,
        task_stages,
    ))
}

fn reference_config(
    channels: [usize; 5],
    window: [usize; 3],
    spacing_mm: f64,
    blocks: usize,
    task_stages: usize,
) -> IrisConfig {
    IrisConfig::new(channels, window, spacing_mm)
        .with_blocks(blocks)
        .with_task_stages(task_stages)
        .with_query_tokens(REFERENCE_QUERY_TOKENS)
        .with_attention_blocks(REFERENCE_ATTENTION_BLOCKS)
        .with_head_dim(REFERENCE_HEAD_DIM)
        .with_mlp_ratio(REFERENCE_MLP_RATIO)
}

fn describe(value: &PickleValue) -> String {
    match value {
        PickleValue::None => "None".into(),
        PickleValue::Bool(b) => b.to_string(),
        PickleValue::Int(i) => i.to_string(),
        PickleValue::Float(f) => f.to_string(),
        PickleValue::String(s) => format!("{s:?}"),
        PickleValue::List(items) => format!(
            "[{}]",
            items.iter().map(describe).collect::<Vec<_>>().join(", ")
        ),
        PickleValue::Dict(_) => "a dictionary".into(),
        PickleValue::Bytes(_) => "bytes".into(),
        PickleValue::Unsupported(kind) => format!("a {kind}"),
    }
}

/// An integer or a list of integers, as a list.
fn ints(value: &PickleValue, key: &str) -> Result<Vec<usize>, String> {
    let items = match value {
        PickleValue::List(items) => items.as_slice(),
        single => std::slice::from_ref(single),
    };
    items
        .iter()
        .map(|item| match item {
            PickleValue::Int(i) if *i >= 0 => Ok(*i as usize),
            _ => Err(format!(
                "`{key}`: expected non-negative integers, found {}",
                describe(value)
            )),
        })
        .collect()
}

fn single_int(value: &PickleValue, key: &str) -> Result<usize, String> {
    match ints(value, key)?.as_slice() {
        [n] => Ok(*n),
        _ => Err(format!(
            "`{key}`: expected one integer, found {}",
            describe(value)
        )),
    }
}

fn floats(value: &PickleValue, key: &str) -> Result<Vec<f64>, String> {
    let items = match value {
        PickleValue::List(items) => items.as_slice(),
        single => std::slice::from_ref(single),
    };
    items
        .iter()
        .map(|item| match item {
            PickleValue::Float(f) if f.is_finite() && *f > 0.0 => Ok(*f),
            PickleValue::Int(i) if *i > 0 => Ok(*i as f64),
            _ => Err(format!(
                "`{key}`: expected positive numbers, found {}",
                describe(value)
            )),
        })
        .collect()
}

/// An integer, or a list of integers, that must all be `expected`
/// (`count` of them when a list).
fn expect_ints(
    value: &PickleValue,
    key: &str,
    expected: usize,
    count: usize,
) -> Result<(), String> {
    let values = ints(value, key)?;
    let fits =
        values.iter().all(|&v| v == expected) && (values.len() == 1 || values.len() == count);
    if fits {
        Ok(())
    } else {
        Err(format!(
            "`{key}`: this model supports {expected} only, found {}",
            describe(value)
        ))
    }
}

fn expect_string(value: &PickleValue, key: &str, expected: &str) -> Result<(), String> {
    match value {
        PickleValue::String(s) if s == expected => Ok(()),
        _ => Err(format!(
            "`{key}`: this model supports {expected:?} only, found {}",
            describe(value)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dict(entries: &[(&str, PickleValue)]) -> HashMap<String, PickleValue> {
        entries
            .iter()
            .map(|(key, value)| (key.to_string(), value.clone()))
            .collect()
    }

    fn list(values: &[i64]) -> PickleValue {
        PickleValue::List(values.iter().map(|v| PickleValue::Int(*v)).collect())
    }

    /// The released configuration's `model` section, with `edit` applied.
    fn config(edit: &[(&str, PickleValue)]) -> HashMap<String, PickleValue> {
        let mut model = dict(&[
            ("type", PickleValue::String("iris".into())),
            ("in_ch", PickleValue::Int(1)),
            ("channels", list(&[32, 64, 128, 256, 512])),
            ("scale", list(&[2, 2, 2, 2])),
            ("kernel_size", list(&[3, 3, 3, 3, 3])),
            ("block", PickleValue::String("BasicBlock".into())),
            ("num_block", list(&[2, 2, 2, 2])),
            ("pool", PickleValue::Bool(true)),
            ("norm", PickleValue::String("in".into())),
            ("tn", PickleValue::Int(73)),
            ("num_prior_stage", PickleValue::Int(3)),
        ]);
        model.extend(dict(edit));
        let spacing = PickleValue::List(vec![PickleValue::Float(1.5); 3]);
        let evaluation = dict(&[("window_size", list(&[128, 128, 128]))]);
        dict(&[
            ("model", PickleValue::Dict(model)),
            ("target_spacing", spacing),
            ("evaluation", PickleValue::Dict(evaluation)),
        ])
    }

    #[test]
    fn the_released_configuration_is_the_paper_preset() {
        let parsed = config_from_entry(&config(&[]), &ImportOptions::default()).expect("parses");
        let paper = IrisConfig::paper();
        assert_eq!(parsed.channels, paper.channels);
        assert_eq!(parsed.patch_size, paper.patch_size);
        assert_eq!(parsed.spacing_mm, paper.spacing_mm);
        assert_eq!(
            (
                parsed.blocks,
                parsed.task_stages,
                parsed.query_tokens,
                parsed.head_dim
            ),
            (
                paper.blocks,
                paper.task_stages,
                paper.query_tokens,
                paper.head_dim
            )
        );
        let base = config(&[
            ("channels", PickleValue::None),
            ("base_ch", PickleValue::Int(16)),
        ]);
        let parsed = config_from_entry(&base, &ImportOptions::default()).expect("parses");
        assert_eq!(parsed.channels, [16, 32, 64, 128, 256]);
        let options = ImportOptions {
            window: Some([96, 96, 64]),
            spacing_mm: Some(2.0),
            ..ImportOptions::default()
        };
        let parsed = config_from_entry(&config(&[]), &options).expect("parses");
        assert_eq!((parsed.patch_size, parsed.spacing_mm), ([96, 96, 64], 2.0));
    }

    #[test]
    fn a_configuration_the_model_cannot_represent_is_refused_by_name() {
        let cases = [
            (
                "block",
                PickleValue::String("Bottleneck".into()),
                "`config.model.block`",
            ),
            (
                "norm",
                PickleValue::String("bn".into()),
                "`config.model.norm`",
            ),
            (
                "kernel_size",
                list(&[3, 3, 5, 3, 3]),
                "`config.model.kernel_size`",
            ),
            ("scale", list(&[2, 2, 2, 4]), "`config.model.scale`"),
            ("pool", PickleValue::Bool(false), "`config.model.pool`"),
            ("num_block", list(&[2, 2, 3, 2]), "`config.model.num_block`"),
            ("in_ch", PickleValue::Int(2), "`config.model.in_ch`"),
            (
                "channels",
                list(&[32, 64, 128, 256]),
                "`config.model.channels`",
            ),
            (
                "type",
                PickleValue::String("unet".into()),
                "`config.model.type`",
            ),
        ];
        for (key, value, needle) in cases {
            let message = config_from_entry(&config(&[(key, value)]), &ImportOptions::default())
                .expect_err(key);
            assert!(message.contains(needle), "{message}");
            assert!(message.contains("found"), "{message}");
        }
        let mut anisotropic = config(&[]);
        anisotropic.insert(
            "target_spacing".into(),
            PickleValue::List(vec![
                PickleValue::Float(3.0),
                PickleValue::Float(1.5),
                PickleValue::Float(1.5),
            ]),
        );
        let message = config_from_entry(&anisotropic, &ImportOptions::default()).expect_err("3 mm");
        assert!(message.contains("`config.target_spacing`"), "{message}");
    }
}
