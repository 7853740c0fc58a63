"""Package discovery; everything else is in setup.cfg.

Every code package under medseg/ is found, so a new subpackage always lands in the wheel. pipelines/
and sample_data/ live at the top of the repository and are installed inside the package (setup.cfg's
package_dir), so `--task prostate` works after a plain `pip install .`.
"""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["medseg", "medseg.*"]) + ["medseg.pipelines", "medseg.sample_data"])
