"""`wisp_distill`: trains a feature-conditioned (EAGLE-style) draft for a target model.

Three stages, each resumable; `--stage all` runs whatever is not done yet:

1. generate: the target answers training prompts greedily through WISP's own
   `VerificationEngine` (vLLM where installed, so many answers share each
   step). Each answer is stored with the target's feature at every position,
   in half floats, in shards under the work directory, named by the prompts'
   source, so answers to several sources can be trained on together. By
   default the target writes the prompts too: sampled after its chat
   template's user header, it asks what its own instruction data taught it
   users ask (Magpie, Xu et al. 2024), which is far more varied than templates.
2. train: an `EagleDraftModel` learns to predict the target's next feature
   from its current feature and the next token (smooth L1), and the target's
   next-token distribution over the draft's trimmed vocabulary (soft cross
   entropy), with noise on its input features so it copes with its own
   predictions (Li et al. 2024). Progress lines show loss and the draft's
   greedy agreement with the target on held-out answers; a checkpoint is
   written as it goes.
3. export: the trained draft, the target's tokenizer and a record of the
   recipe, into the output directory; `wisp-edge --draft-model DIR` loads it.

One module per stage (`data`, `train`, `export`) and the command line (`cli`).
Training is neither server nor edge: it answers prompts through the server's
engines and writes the draft format the edge reads (`wisp_common.eagle`).
"""
