//! The size curriculum of a run ([`Curriculum`]).

/// The curriculum of a run: the smallest class size of an episode, as a
/// fraction of the patch, falls linearly from `fraction` at step 0 to 0 at
/// `steps`, so that the model first learns from large structures (an
/// episode of an 8-voxel class gives almost no Dice gradient to a model
/// that still predicts background everywhere). Its settings are
/// [`TrainingConfig::curriculum_fraction`](super::TrainingConfig::curriculum_fraction)
/// and [`curriculum_steps`](super::TrainingConfig::curriculum_steps).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Curriculum {
    /// The bound at step 0, a fraction of the patch's voxels (0 or less:
    /// no curriculum).
    pub fraction: f64,
    /// The step at which the bound reaches 0 (0: no curriculum).
    pub steps: usize,
}

impl Curriculum {
    /// Steps between changes of the bound (each change rescans the classes).
    pub const EVERY: usize = 100;

    /// The bound to set before `step`
    /// ([`EpisodeSampler::set_min_foreground_fraction`](crate::data::EpisodeSampler::set_min_foreground_fraction)),
    /// when it changes there (or when the run starts or resumes there:
    /// `first`); `None` when it does not change, or after `steps`.
    pub fn update(&self, step: usize, first: bool) -> Option<f64> {
        if self.fraction <= 0.0 || self.steps == 0 || !(first || step.is_multiple_of(Self::EVERY)) {
            return None;
        }
        (step <= self.steps).then(|| self.fraction * (1.0 - step as f64 / self.steps as f64))
    }
}

#[cfg(test)]
mod tests {
    use super::Curriculum;

    #[test]
    fn curriculum_falls_linearly_and_is_set_on_resume() {
        let c = Curriculum {
            fraction: 0.01,
            steps: 1000,
        };
        assert_eq!(c.update(0, true), Some(0.01));
        assert_eq!(c.update(50, false), None, "only every 100 steps");
        assert_eq!(
            c.update(50, true),
            Some(0.01 * 0.95),
            "a resumed run sets it at once"
        );
        assert_eq!(c.update(500, false), Some(0.005));
        assert_eq!(c.update(1000, false), Some(0.0));
        assert_eq!(c.update(1100, false), None, "past the curriculum");
        let off = Curriculum {
            fraction: 0.0,
            steps: 1000,
        };
        assert_eq!(off.update(0, true), None);
    }
}
