"""
One file per benchmark: each holds its reader (the released files, exactly as released) and its
scorer, `evaluate(model, preprocess, tokenizer, device, ...)`, and `run(..., args)`, which
eval.py's `--bench NAME` calls with the CLI's flags. Adding a benchmark is adding a file here.
common.py is the multiple-choice scoring they share; explain.py the word-patch explanations
(eval.py --explain).
"""
