"""Per-notebook checks: ``tests/nbchecks/<stem>.py`` defines ``check(results)``.

``tests/test_notebooks.py`` runs ``notebooks/<stem>.ipynb`` with smoke
parameters and passes the JSON it wrote (``RESULTS_JSON``) to ``check``, which
asserts on numbers that would be wrong if the notebook's claims were.
"""
