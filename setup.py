"""Packaging for couchdb-session: an editing session for CouchDB."""

import os
import re

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version():
    """Return ``__version__`` from session.py without importing it."""
    with open(os.path.join(HERE, 'session.py'), encoding='utf-8') as source:
        match = re.search(
            r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", source.read(), re.M)
    if match is None:
        raise RuntimeError('no __version__ found in session.py')
    return match.group(1)


def read_long_description():
    """Return README.txt's text, or an empty string if there is none."""
    try:
        with open(os.path.join(HERE, 'README.txt'), encoding='utf-8') as readme:
            return readme.read()
    except FileNotFoundError:
        return ''


CLASSIFIERS = [
    'Development Status :: 3 - Alpha',
    'Intended Audience :: Developers',
    'Operating System :: OS Independent',
    'Programming Language :: Python :: 3',
    'Programming Language :: Python :: 3 :: Only',
    'Programming Language :: Python :: 3.9',
    'Programming Language :: Python :: 3.10',
    'Programming Language :: Python :: 3.11',
    'Programming Language :: Python :: 3.12',
    'Programming Language :: Python :: 3.13',
    'Topic :: Database',
    'Topic :: Software Development :: Libraries :: Python Modules',
]

setup(
    name='couchdb-session',
    version=read_version(),
    description='An editing session (unit of work) for CouchDB documents',
    long_description=read_long_description(),
    long_description_content_type='text/plain',
    author='The session authors',
    license_expression='BSD-3-Clause',
    license_files=['LICENSE'],
    # The module lives at the top of the tree; saying so makes an editable
    # install a plain .pth file (as `setup.py develop` made) rather than an
    # import hook that setuptools warns about at every install.
    package_dir={'': '.'},
    py_modules=['session'],
    python_requires='>=3.9',
    install_requires=[
        'CouchDB>=1.2,<1.3',
        'ProxyTypes>=0.10',
    ],
    extras_require={
        # Flask: the README's and the tests' Flask app.
        'test': ['pytest', 'hypothesis', 'jsonpatch', 'flask'],
    },
    classifiers=CLASSIFIERS,
)
