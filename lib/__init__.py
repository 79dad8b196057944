"""lib: everything a reader of the six chapters can skip (issue 31's support package).

The chapters (bpe.py, model.py, optim.py, accounting.py, train.py, sample.py) are what the CS336 handout asks a
student to build, and that readable code is what runs by default. This package holds the rest, each module named
for what it holds; its header says which chapter it serves. Two floors, with the chapters standing between them:

  below the chapters (import no chapter; take what they need as arguments)
    cli.py        the one-line error and its exit codes (2 bad input, 1 environment), atomic writes, optional imports

  above the chapters (operations; import chapters freely)

README's "Layout" section draws the whole map.
"""
