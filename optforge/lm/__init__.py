"""The causal-LM task (`task: causal-lm`): the torch side shared by the lm_* stage kinds and the causal-LM
artifacts (optforge.artifacts.lm). `model` loads, builds, saves and converts models; `train` trains them
(LM loss, distillation on next-token distributions); `perplexity` is the evaluation protocol; `decode`
the prefill / decode loops the benchmark times. Importing this package imports nothing."""
