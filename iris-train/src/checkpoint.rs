//! Checkpoints that resume a run exactly.
//!
//! `<out>/checkpoint/` holds:
//!
//! | file | content |
//! |---|---|
//! | `config.json` | the [`TrainingConfig`] (`burn::config::Config::save`): every setting of the run, model sizes, data and curriculum included (read with [`TrainingConfig::from_json`], which also reads older files) |
//! | `model.bpk` | the weights (burnpack, with parameter ids, so the optimizer state matches) |
//! | `optimizer.bpk` | LAMB's per-parameter state (burnpack) |
//! | `state.json` | steps done, the model fingerprint, the bank's `key -> (id, name)` table |
//! | `memory_bank.irisemb` | the bank (exact `f32`), when it has entries |
//!
//! Nothing else is needed: the episodes of step `s` come from seeds
//! derived from the configuration's episode seed and `s`, and the learning
//! rate is a function of `s`.
//! The folder is written as `.checkpoint.tmp-<pid>/` and then swapped in
//! with two renames (the previous one goes to `.checkpoint.old/` and is
//! removed after), so a crash never leaves a partial checkpoint:
//! [`Trainer::resume`] falls back to `.checkpoint.old/` when it finds no
//! `checkpoint/`. The bank is also written to `<out>/memory_bank.irisemb`
//! for users.

use std::fs;
use std::path::{Path, PathBuf};

use burn::config::Config;
use burn::prelude::*;

use crate::bank::MemoryBank;
use crate::error::Error;
use crate::training::{Trainer, TrainingConfig, model_fingerprint};
use iris_core::embedding::ModelFingerprint;

/// Name of the checkpoint folder inside the output folder.
pub const CHECKPOINT_DIR: &str = "checkpoint";
/// Name of the user-facing memory bank inside the output folder.
pub const BANK_FILE: &str = "memory_bank.irisemb";
const OLD_DIR: &str = ".checkpoint.old";
const CONFIG_FILE: &str = "config.json";
const MODEL_FILE: &str = "model.bpk";
const OPTIMIZER_FILE: &str = "optimizer.bpk";
const STATE_FILE: &str = "state.json";

/// The small state of a checkpoint besides the weights and the bank.
#[derive(Config, Debug)]
struct CheckpointState {
    /// Steps done.
    step: usize,
    /// Model fingerprint (64 hex digits) of the saved weights.
    fingerprint: String,
    /// Bank class keys; key `i` has id `i + 1`.
    class_keys: Vec<String>,
    /// Bank class names, same order.
    class_names: Vec<String>,
}

fn failed(path: &Path, reason: impl std::fmt::Display) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// The checkpoint folder of output folder `out` that [`Trainer::resume`]
/// would read, if any.
pub fn find(out: &Path) -> Option<PathBuf> {
    [CHECKPOINT_DIR, OLD_DIR]
        .iter()
        .map(|d| out.join(d))
        .find(|d| d.join(STATE_FILE).is_file())
}

impl Trainer {
    /// Writes the checkpoint to `<out>/checkpoint/` (atomically) and the
    /// bank to `<out>/memory_bank.irisemb`; creates `out` if needed.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] naming the file that could not be written.
    pub fn save_checkpoint(&self, out: &Path) -> Result<(), Error> {
        fs::create_dir_all(out).map_err(|e| failed(out, e))?;
        let tmp = out.join(format!(".checkpoint.tmp-{}", std::process::id()));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(|e| failed(&tmp, e))?;
        }
        fs::create_dir(&tmp).map_err(|e| failed(&tmp, e))?;
        let fingerprint = model_fingerprint(&self.model, &self.config.model);

        let path = tmp.join(CONFIG_FILE);
        self.config.save(&path).map_err(|e| failed(&path, e))?;
        let path = tmp.join(MODEL_FILE);
        self.model
            .clone()
            .save_file(&path)
            .map_err(|e| failed(&path, e))?;
        let path = tmp.join(OPTIMIZER_FILE);
        self.optimizer.save(&path).map_err(|e| failed(&path, e))?;
        let path = tmp.join(crate::checkpoint::BANK_FILE);
        self.bank.write(&path, fingerprint)?;
        let (keys, names) = self.bank.table();
        let state = CheckpointState::new(
            self.step,
            fingerprint.to_string(),
            keys.to_vec(),
            names.to_vec(),
        );
        let path = tmp.join(STATE_FILE);
        state.save(&path).map_err(|e| failed(&path, e))?;
        sync_folder(&tmp)?;

        let current = out.join(CHECKPOINT_DIR);
        let old = out.join(OLD_DIR);
        if old.exists() {
            fs::remove_dir_all(&old).map_err(|e| failed(&old, e))?;
        }
        if current.exists() {
            fs::rename(&current, &old).map_err(|e| failed(&current, e))?;
        }
        fs::rename(&tmp, &current).map_err(|e| failed(&current, e))?;
        if old.exists() {
            fs::remove_dir_all(&old).map_err(|e| failed(&old, e))?;
        }
        self.bank.write(&out.join(BANK_FILE), fingerprint)?;
        Ok(())
    }

    /// Resumes the run saved in `out` (see [`find`]) on `device` (its
    /// autodiff version holds the model). The weights' fingerprint must
    /// match the one saved, and the bank file must carry it.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] when there is no checkpoint or a file is
    /// unreadable or inconsistent; [`Error::Core`] for a bad bank file.
    pub fn resume(out: &Path, device: &Device) -> Result<Self, Error> {
        let dir = find(out).ok_or_else(|| {
            failed(
                &out.join(CHECKPOINT_DIR),
                "no checkpoint to resume (start without --resume)",
            )
        })?;
        let path = dir.join(CONFIG_FILE);
        let config = fs::read_to_string(&path)
            .map_err(|e| failed(&path, e))
            .and_then(|json| TrainingConfig::from_json(&json).map_err(|e| failed(&path, e)))?;
        let path = dir.join(STATE_FILE);
        let state = CheckpointState::load(&path).map_err(|e| failed(&path, e))?;
        let saved = ModelFingerprint::from_hex(&state.fingerprint)?;

        let device = device.clone().autodiff();
        let path = dir.join(MODEL_FILE);
        let model = config
            .model
            .init(&device)?
            .try_load_file(&path)
            .map_err(|e| failed(&path, e))?;
        let fingerprint = model_fingerprint(&model, &config.model);
        if fingerprint != saved {
            return Err(failed(
                &path,
                format!("weights have fingerprint {fingerprint}, {STATE_FILE} says {saved}"),
            ));
        }
        let path = dir.join(OPTIMIZER_FILE);
        let optimizer = config
            .optimizer()
            .load(&path)
            .map_err(|e| failed(&path, e))?;
        let bank_path = dir.join(BANK_FILE);
        let bank = MemoryBank::restore(
            &config.model,
            config.bank_momentum as f32,
            state.class_keys,
            state.class_names,
            bank_path
                .is_file()
                .then_some((bank_path.as_path(), fingerprint)),
        )?;
        Ok(Trainer {
            config,
            model,
            optimizer,
            bank,
            step: state.step,
        })
    }
}

/// Flushes every file of `dir` (and the folder) to disk before the rename
/// that publishes it.
fn sync_folder(dir: &Path) -> Result<(), Error> {
    let entries = fs::read_dir(dir).map_err(|e| failed(dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| failed(dir, e))?.path();
        fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(|e| failed(&path, e))?;
    }
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| failed(dir, e))
}
