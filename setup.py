"""setuptools' build, starting from an empty build/lib each time: `pip install .` builds in
the checkout, and setuptools copies the package into build/lib without removing what an
earlier build left there, so a fork that deleted a module (cliquejax/cpu/) would install
the stale copy. The metadata is pyproject.toml's."""

import shutil

from setuptools import setup
from setuptools.command.build import build


class CleanBuild(build):
    def run(self):
        shutil.rmtree(self.build_lib, ignore_errors=True)
        super().run()


setup(cmdclass={"build": CleanBuild})
