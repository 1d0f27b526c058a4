"""Source-free domain adaptation methods: every module here is imported, so each method registers itself."""

from dfkt.registry import import_package_modules

import_package_modules(__name__, __path__)
