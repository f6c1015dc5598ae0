"""For Ray nodes started with this folder on PYTHONPATH and TESSERA_TEST_KEYS set: once a
worker imports pipeline.train.trainer, tests/record_keys.py records the keys of every batch it
draws, numbering launches by Ray job (a later job that runs a step again replaces what an
earlier one drew). Tests only."""

import os
import sys

if os.environ.get("TESSERA_TEST_KEYS"):
    import importlib.abc
    import importlib.util

    TARGET = "pipeline.train.trainer"

    def _job_number() -> int:
        import ray

        return int(ray.get_runtime_context().get_job_id(), 16)

    class _RecordAfterImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != TARGET:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
                import record_keys

                record_keys.install(module, _job_number)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _RecordAfterImport())
