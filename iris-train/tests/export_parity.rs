//! The exported ONNX graphs compute what the burn model computes: each of
//! the three graphs, run by tract (and by onnxruntime through
//! `scripts/onnx_parity.py` when it is installed), agrees with the burn
//! forward pass within 1e-4 on random weights and inputs.

use std::fs;
use std::path::Path;
use std::process::Command;

use burn::module::{ModuleMapper, Param};
use burn::prelude::*;
use burn::tensor::Distribution;
use iris_test_support::TempDir;
use iris_train::bank::MemoryBank;
use iris_train::data::ClassKey;
use iris_train::export::{self, OnnxGraphs};
use iris_train::model::{Iris, IrisConfig, TaskTensors};
use iris_train::training::model_fingerprint;

/// Largest absolute difference allowed between burn and an ONNX runtime.
const TOLERANCE: f32 = 1e-4;

/// A row-major `f32` array with its shape: what goes in and out of the
/// graphs.
#[derive(Clone, Debug)]
struct Array {
    shape: Vec<usize>,
    values: Vec<f32>,
}

impl Array {
    fn of<const D: usize>(tensor: &Tensor<D>) -> Array {
        Array {
            shape: tensor.dims().to_vec(),
            values: tensor
                .clone()
                .into_data()
                .try_into_vec_as::<f32>()
                .expect("f32 tensor"),
        }
    }

    fn max_abs_diff(&self, other: &Array) -> f32 {
        assert_eq!(self.shape, other.shape, "shapes differ");
        self.values
            .iter()
            .zip(&other.values)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max)
    }
}

/// tract, kept in its own module: its prelude has its own `Tensor`.
mod tract {
    use super::Array;
    use tract_onnx::prelude::*;

    /// A graph optimised once by tract, symbolic dimensions left symbolic.
    pub struct Plan(Arc<TypedRunnableModel>);

    impl Plan {
        pub fn new(bytes: &[u8]) -> Plan {
            let model = tract_onnx::onnx()
                .model_for_read(&mut &bytes[..])
                .expect("tract parses the graph")
                .into_optimized()
                .expect("tract optimises the graph")
                .into_runnable()
                .expect("tract plans the graph");
            Plan(model)
        }

        /// Runs the graph on `inputs` (in the graph's input order).
        pub fn run(&self, inputs: &[&Array]) -> Vec<Array> {
            let inputs: TVec<TValue> = inputs
                .iter()
                .map(|a| {
                    Tensor::from_shape(&a.shape, &a.values)
                        .expect("input tensor")
                        .into_tvalue()
                })
                .collect();
            self.0
                .run(inputs)
                .expect("tract runs the graph")
                .iter()
                .map(|t| Array {
                    shape: t.shape().to_vec(),
                    values: t
                        .try_as_plain_ram()
                        .and_then(|v| v.as_slice::<f32>().map(<[f32]>::to_vec))
                        .expect("f32 output"),
                })
                .collect()
        }
    }
}

/// Perturbs every parameter so that layer-norm scales and biases and
/// zero-initialised biases all carry information: vectors get uniform
/// noise in `[-0.2, 0.2)`, weight matrices and kernels are scaled by
/// `1 + [-0.2, 0.2)` per entry (keeping their initialised magnitude).
struct Perturb;

impl ModuleMapper for Perturb {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        param.map(|t| {
            let noise = Tensor::random(t.shape(), Distribution::Uniform(-0.2, 0.2), &t.device());
            if D == 1 {
                t + noise
            } else {
                t.clone() + t * noise
            }
        })
    }
}

/// A random model, a random image and `K` random binary masks, with every
/// intermediate result of the burn forward pass.
struct Case {
    config: IrisConfig,
    model: Iris,
    image: Array,
    masks: Array,
    features: Vec<Array>,
    tasks: Vec<Array>,
    logits: Array,
    /// `features` and `tasks` as burn tensors.
    burn_features: Vec<Tensor<5>>,
    embedding: TaskTensors,
}

/// The burn decoder and head on burn tensors.
fn burn_decode(model: &Iris, features: &[Tensor<5>], embedding: &TaskTensors) -> Tensor<5> {
    let (decoded, summaries) = model.decoder.forward(features, embedding);
    model.head.forward(decoded, summaries)
}

fn case(config: IrisConfig, seed: u64, classes: usize) -> Case {
    let device = Device::flex();
    device.seed(seed);
    let model = config
        .init(&device)
        .expect("valid config")
        .map(&mut Perturb);
    let [d, h, w] = config.patch_size;
    let image = Tensor::<5>::random([1, 1, d, h, w], Distribution::Normal(0.0, 1.0), &device);
    let masks = Tensor::<5>::random([1, classes, d, h, w], Distribution::Default, &device)
        .greater_elem(0.6)
        .float();
    let features = model.encoder.forward(image.clone());
    let embedding = model.task_encoder.forward(&features, masks.clone());
    let logits = burn_decode(&model, &features, &embedding);
    Case {
        image: Array::of(&image),
        masks: Array::of(&masks),
        features: features.iter().map(Array::of).collect(),
        tasks: embedding.stages.iter().map(Array::of).collect(),
        logits: Array::of(&logits),
        burn_features: features,
        embedding,
        config,
        model,
    }
}

/// Max abs difference of each output, asserting `TOLERANCE`.
fn compare(part: &str, names: &[String], expected: &[&Array], found: &[Array]) -> f32 {
    assert_eq!(found.len(), expected.len(), "{part}: output count");
    let mut worst = 0.0f32;
    for ((name, e), f) in names.iter().zip(expected).zip(found) {
        let diff = e.max_abs_diff(f);
        let scale = e.values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        println!("{part} {name}: max abs diff {diff:.2e} (values up to {scale:.2e})");
        assert!(diff < TOLERANCE, "{part} {name}: max abs diff {diff}");
        worst = worst.max(diff);
    }
    worst
}

fn names(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}_{i}")).collect()
}

/// Exports `case`'s model and checks each graph against burn with tract.
fn check_with_tract(case: &Case) {
    let graphs = OnnxGraphs::new(&case.model, &case.config).expect("export");
    let [(_, encoder), (_, task_encoder), (_, decoder)] = graphs.to_files();
    let stages = case.config.task_stages;

    let found = tract::Plan::new(&encoder).run(&[&case.image]);
    let expected: Vec<&Array> = case.features.iter().collect();
    compare("encoder", &names("features", 0..5), &expected, &found);

    let mut inputs: Vec<&Array> = case.features[5 - stages..].iter().collect();
    inputs.push(&case.masks);
    let found = tract::Plan::new(&task_encoder).run(&inputs);
    let expected: Vec<&Array> = case.tasks.iter().collect();
    compare("task encoder", &names("task", 0..stages), &expected, &found);

    let inputs: Vec<&Array> = case.features.iter().chain(&case.tasks).collect();
    let found = tract::Plan::new(&decoder).run(&inputs);
    compare("decoder", &["logits".into()], &[&case.logits], &found);
}

#[test]
fn tiny_graphs_match_burn_in_tract() {
    check_with_tract(&case(IrisConfig::tiny(), 11, 2));
}

/// The small preset (64³ windows); run with `--ignored`.
#[test]
#[ignore = "slow in debug builds: run with --ignored"]
fn small_graphs_match_burn_in_tract() {
    check_with_tract(&case(IrisConfig::small(), 16, 2));
}

/// Non-default sizes: an anisotropic patch, four task stages (one at
/// scale 2), one block per stage, several heads per level, other token
/// and MLP counts.
fn varied_config() -> IrisConfig {
    IrisConfig::new([4, 8, 16, 16, 32], [16, 32, 48], 5.0)
        .with_task_stages(4)
        .with_blocks(1)
        .with_attention_blocks(1)
        .with_query_tokens(3)
        .with_head_dim(8)
        .with_mlp_ratio(2)
}

#[test]
fn varied_config_graphs_match_burn_in_tract() {
    check_with_tract(&case(varied_config(), 12, 2));
}

#[test]
fn decoder_graph_takes_any_class_count() {
    // One decoder plan (symbolic `classes`) run with 1 and 3 classes.
    let config = IrisConfig::tiny();
    let case = case(config.clone(), 13, 3);
    let graphs = OnnxGraphs::new(&case.model, &config).expect("export");
    let [_, (_, task_encoder), (_, decoder)] = graphs.to_files();
    let decoder = tract::Plan::new(&decoder);
    let task_encoder = tract::Plan::new(&task_encoder);
    let embedding = &case.embedding;
    for classes in [vec![1], vec![2, 0, 1]] {
        let subset = embedding.select_classes(&classes);
        let tasks: Vec<Array> = subset.stages.iter().map(Array::of).collect();
        let logits = Array::of(&burn_decode(&case.model, &case.burn_features, &subset));
        assert_eq!(logits.shape[1], classes.len());
        let inputs: Vec<&Array> = case.features.iter().chain(&tasks).collect();
        let found = decoder.run(&inputs);
        compare(
            "decoder",
            &[format!("logits, classes {classes:?}")],
            &[&logits],
            &found,
        );
    }
    // The task encoder's plan also takes any class count: one mask alone
    // gives that class's tokens.
    let one_mask = Array {
        shape: vec![1, 1, 32, 32, 32],
        values: case.masks.values[2 * 32 * 32 * 32..].to_vec(),
    };
    let mut inputs: Vec<&Array> = case.features[2..].iter().collect();
    inputs.push(&one_mask);
    let found = task_encoder.run(&inputs);
    let expected: Vec<Array> = embedding
        .select_classes(&[2])
        .stages
        .iter()
        .map(Array::of)
        .collect();
    let expected: Vec<&Array> = expected.iter().collect();
    compare(
        "task encoder, class 2 alone",
        &names("task", 0..3),
        &expected,
        &found,
    );
}

#[test]
fn every_parameter_is_exported_once() {
    // The parameters' initializers (named by their path in the model, the
    // other constants are norms' unit scales, interpolation matrices and
    // shapes) hold exactly as many values as each part has parameters...
    let config = varied_config();
    let model = config.init(&Device::flex()).expect("model");
    let graphs = OnnxGraphs::new(&model, &config).expect("export");
    let parameters = |graph: &tract_onnx::pb::ModelProto| -> usize {
        let graph = graph.graph.as_ref().expect("graph");
        graph
            .initializer
            .iter()
            .filter(|t| {
                [
                    ".weight",
                    ".bias",
                    ".gamma",
                    ".beta",
                    ".queries",
                    ".position",
                ]
                .iter()
                .any(|suffix| t.name.ends_with(suffix))
            })
            .map(|t| t.dims.iter().product::<i64>() as usize)
            .sum()
    };
    assert_eq!(parameters(&graphs.encoder), model.encoder.num_params());
    // But the task encoder's cross-attentions (one per query block of each
    // stage, as wide as the stage) in their folded form: the softmax
    // cancels the keys' biases, and the context norm's scale and shift are
    // folded into the key and value weights and the value bias. Three
    // vectors of the stage's width each leave.
    let folded_away = 3 * config.attention_blocks * config.task_channels().iter().sum::<usize>();
    assert!(folded_away > 0, "the task encoder has cross-attentions");
    assert_eq!(
        parameters(&graphs.task_encoder),
        model.task_encoder.num_params() - folded_away
    );
    assert_eq!(
        parameters(&graphs.decoder),
        model.decoder.num_params() + model.head.num_params()
    );
}

fn read_manifest(dir: &Path) -> serde_json::Value {
    let text = fs::read_to_string(dir.join(export::MANIFEST_FILE)).expect("manifest");
    serde_json::from_str(&text).expect("manifest is JSON")
}

#[test]
fn manifest_round_trips_and_bank_is_written() {
    let config = IrisConfig::tiny();
    let case = case(config.clone(), 14, 2);
    let scratch = TempDir::new("export-manifest");
    let dir = scratch.join("out");

    // With a bank that has entries.
    let mut bank = MemoryBank::new(&config, 0.9).expect("bank");
    let keys = [ClassKey::new("test", 1), ClassKey::new("test", 2)];
    bank.observe(&keys, &case.embedding).expect("observe");
    let fingerprint =
        export::export(&case.model, &config, "iris-test", &dir, Some(&bank), 2).expect("export");
    assert_eq!(fingerprint, model_fingerprint(&case.model, &config));

    let manifest = read_manifest(&dir);
    assert_eq!(manifest["format"], "iris-model");
    assert_eq!(manifest["format_version"], 1);
    assert_eq!(manifest["name"], "iris-test");
    assert_eq!(manifest["fingerprint"], fingerprint.to_string());
    assert_eq!(manifest["opset"], 17);
    assert_eq!(manifest["classes_per_forward"], 2);
    assert_eq!(manifest["patch_size"], serde_json::json!([32, 32, 32]));
    assert_eq!(manifest["spacing_mm"], 6.0);
    assert_eq!(manifest["channels"], serde_json::json!([4, 8, 16, 32, 32]));
    assert_eq!(
        manifest["stages"],
        serde_json::json!([
            {"tokens": 11, "channels": 32},
            {"tokens": 11, "channels": 32},
            {"tokens": 11, "channels": 16}
        ])
    );
    let parsed: IrisConfig =
        serde_json::from_value(manifest["config"].clone()).expect("config parses");
    assert_eq!(
        serde_json::to_value(&parsed).expect("json"),
        serde_json::to_value(&config).expect("json")
    );
    // The fingerprint recomputed from the manifest's config is the same.
    assert_eq!(model_fingerprint(&case.model, &parsed), fingerprint);
    for key in ["encoder", "task_encoder", "decoder"] {
        let file = manifest["graphs"][key].as_str().expect("graph file");
        assert!(dir.join(file).is_file(), "{file}");
    }
    assert_eq!(manifest["memory_bank"], "memory_bank.irisemb");
    let bank_file = iris_core::irisemb::read_file(dir.join(export::BANK_FILE)).expect("bank");
    assert_eq!(*bank_file.model(), fingerprint);
    assert_eq!(bank_file.classes().len(), 2);
    let shapes: Vec<[u32; 2]> = bank_file
        .stage_shapes()
        .iter()
        .map(|s| [s.tokens, s.channels])
        .collect();
    assert_eq!(shapes, vec![[11, 32], [11, 32], [11, 16]]);

    // Exporting again without a bank removes the old bank file; nothing
    // but the model's files is left in the folder.
    export::export(&case.model, &config, "iris-test", &dir, None, 1).expect("export");
    assert!(read_manifest(&dir).get("memory_bank").is_none());
    let mut files: Vec<String> = fs::read_dir(&dir)
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "decoder.onnx",
            "encoder.onnx",
            "manifest.json",
            "task_encoder.onnx"
        ]
    );
}

#[test]
fn export_refuses_a_config_that_does_not_fit_the_weights() {
    let device = Device::flex();
    let model = IrisConfig::tiny().init(&device).expect("model");
    let other = IrisConfig::tiny().with_query_tokens(4);
    let error = OnnxGraphs::new(&model, &other).expect_err("mismatch");
    let message = error.to_string();
    assert!(
        message.contains("task_encoder.stages.0.queries") && message.contains("[10, 32]"),
        "{message}"
    );
    let scratch = TempDir::new("export-refused");
    let error = export::export(
        &model,
        &IrisConfig::tiny(),
        " ",
        &scratch.join("name"),
        None,
        1,
    )
    .expect_err("empty name");
    assert!(error.to_string().contains("model name"), "{error}");
    let dir = scratch.join("no-classes");
    let error = export::export(&model, &IrisConfig::tiny(), "iris", &dir, None, 0)
        .expect_err("no classes per run");
    assert!(error.to_string().contains("classes_per_forward"), "{error}");
    assert!(!dir.join("manifest.json").exists(), "nothing is written");
}

/// Writes `array` as raw little-endian `f32` to `dir/file` and describes it.
fn write_array(dir: &Path, file: &str, array: &Array) -> serde_json::Value {
    let bytes: Vec<u8> = array.values.iter().flat_map(|v| v.to_le_bytes()).collect();
    fs::write(dir.join(file), bytes).expect("write array");
    serde_json::json!({ "file": file, "shape": array.shape })
}

/// Writes the arrays of `list` as `dir/{tag}.{name}.bin` and describes
/// them by name.
fn describe(
    dir: &Path,
    tag: &str,
    list: &[(String, &Array)],
) -> serde_json::Map<String, serde_json::Value> {
    list.iter()
        .map(|(name, array)| {
            let file = format!("{tag}.{name}.bin");
            (name.clone(), write_array(dir, &file, array))
        })
        .collect()
}

/// `(prefix_i, arrays[i])` for each array.
fn named<'a>(prefix: &str, arrays: &'a [Array]) -> Vec<(String, &'a Array)> {
    arrays
        .iter()
        .enumerate()
        .map(|(i, a)| (format!("{prefix}_{i}"), a))
        .collect()
}

#[test]
fn onnxruntime_agrees_and_onnx_checker_passes() {
    let required = std::env::var("IRIS_REQUIRE_ONNXRUNTIME").is_ok_and(|v| v == "1");
    let available = Command::new("python3")
        .args(["-c", "import onnx, onnxruntime, numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !available {
        assert!(
            !required,
            "IRIS_REQUIRE_ONNXRUNTIME=1 but `python3 -c \"import onnx, onnxruntime, numpy\"` fails (pip install onnx onnxruntime numpy)"
        );
        println!("skipped: python3 with onnx, onnxruntime and numpy is not available");
        return;
    }
    let config = IrisConfig::tiny();
    let case = case(config.clone(), 15, 2);
    let scratch = TempDir::new("export-onnxruntime");
    let dir = scratch.join("out");
    export::export(&case.model, &config, "iris-parity", &dir, None, 1).expect("export");
    let data = dir.join("parity");
    fs::create_dir_all(&data).expect("dir");

    let features = named("features", &case.features);
    let tasks = named("task", &case.tasks);
    let mut task_inputs = features[5 - config.task_stages..].to_vec();
    task_inputs.push(("masks".into(), &case.masks));
    let decoder_inputs: Vec<_> = features.iter().chain(&tasks).cloned().collect();
    let runs: Vec<serde_json::Value> = [
        (
            "encoder",
            vec![("image".to_string(), &case.image)],
            features.clone(),
        ),
        ("task_encoder", task_inputs, tasks.clone()),
        (
            "decoder",
            decoder_inputs,
            vec![("logits".to_string(), &case.logits)],
        ),
    ]
    .into_iter()
    .map(|(graph, inputs, outputs)| {
        serde_json::json!({
            "graph": graph,
            "inputs": describe(&data, graph, &inputs),
            "outputs": describe(&data, graph, &outputs),
        })
    })
    .collect();
    let spec = serde_json::json!({ "tolerance": TOLERANCE, "runs": runs });
    let spec_path = data.join("parity.json");
    fs::write(&spec_path, spec.to_string()).expect("write spec");

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/onnx_parity.py");
    let output = Command::new("python3")
        .arg(&script)
        .arg(&dir)
        .arg(&spec_path)
        .output()
        .expect("run python3");
    println!("{}", String::from_utf8_lossy(&output.stdout));
    eprintln!("{}", String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "onnx_parity.py failed");
}
