"""`python -m simclr_jax.data.datasets --nifti_dir=DIR`: the synthetic subjects as NIfTI volumes.

Writes DIR/<class>/subject<id>.nii.gz, a folder for
`--config.data.name=nifti_folder --config.data.path=DIR` (see README.md, "Your own
MRI volumes"); `--help` lists the options.
"""

from simclr_jax.data.datasets import synthetic_mri

if __name__ == '__main__':
  synthetic_mri.main()
