r"""Leakage audit: near-duplicate slices across splits, 1-NN floor, subject groups.

On the Kaggle data (about a minute on a CPU):
  python main.py --config=configs/audit.py --config.data.name=alzheimer_mri \
    --workdir=runs/audit
A few seconds on the small synthetic data:
  python main.py --config=configs/audit.py:runlocal --workdir=runs/audit_local
Users' own folder of class subfolders, without subject ids (groups recovered):
  python main.py --config=configs/audit.py --config.data.name=image_folder \
    --config.data.path=/path/to/folder --workdir=runs/audit_folder
Writes audit.json and audit_pairs.png to the workdir.
"""

import ml_collections
from ml_collections import config_dict

from configs import default


def get_config(arg=None):
  """Audit config; arg: 'runlocal' (the small synthetic data set)."""
  args = default.parse_arg(arg, runlocal=False)
  config = default.base_config('audit')
  config.data = default.data_section()
  config.split = default.split_section()
  # The audit checks the data set's own subject ids (for alzheimer_mri: inferred from
  # the file numbering) against recovered near-duplicate groups, so it reads them as
  # stored; training splits use the recovered groups (data.subject_ids='auto').
  config.data.subject_ids = 'dataset'

  # ---------------------------------------------------------------- Audit.
  config.audit = ml_collections.ConfigDict()
  config.audit.image_size = 64  # Images are area-downsampled to this side before comparing pixels.
  config.audit.metric = 'correlation'  # correlation (Pearson of pixels) | cosine.
  config.audit.threshold = config_dict.placeholder(float)  # Near-duplicate similarity; None: calibrate on subject ids.
  config.audit.default_threshold = 0.98  # Threshold when threshold is None and there are no subject ids.
  config.audit.chunk_size = 1024  # Images per block of the similarity search (bounds memory).
  config.audit.num_pairs_shown = 6  # Closest cross-split pairs per scheme drawn in audit_pairs.png.
  # Subject grouping: chains of mutual near-duplicates form a group.
  config.audit.grouping_threshold = config_dict.placeholder(float)  # Link similarity; None: the near-duplicate threshold.
  config.audit.grouping_k = 10  # A link needs each image among the other's grouping_k nearest.
  config.audit.grouping_max_size = config_dict.placeholder(int)  # Optional cap on a group's size (None: no cap).

  if args.runlocal:
    config.data.name = 'synthetic_mri/small'
    config.audit.chunk_size = 256
  return config
