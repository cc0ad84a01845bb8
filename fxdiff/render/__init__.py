"""Renderers: a ``Report`` in, text, SVG, HTML or Model Explorer node data out.

- ``text``            terminal tables (rich)
- ``svg``             the matched graph as Graphviz SVG, coloured by divergence
- ``html``            one self-contained HTML report with the SVG, tables and charts
- ``model_explorer``  per-node metrics in Google Model Explorer's node-data JSON format
"""
