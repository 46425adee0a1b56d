"""File formats that the DataModules and the models, callbacks and tools share.

- ``phases``: surgical phase vocabularies, the ``Frame<TAB>Phase`` file, the 25 fps frame index
  and where Cholec80 / M2CAI16 keep their phase files;
- ``features``: per-video feature arrays (``<video>.npy`` + ``<video>_frames.npy``);
- ``nifti``: masks written as NIfTI on a reference volume's grid;
- ``sites``: the prostate release's site names.

They live in ``distill`` so that ``data_modules`` imports them and ``distill`` never imports
``data_modules`` (entry points aside). The package imports no submodule: reading a phase file
loads neither nibabel nor torch.
"""
