"""Renderers: a ``Report`` in, text, SVG, HTML or Model Explorer node data out.

- ``text``            terminal tables (rich)
- ``svg``             the matched graph as Graphviz SVG, coloured by divergence:
                      ``render_svg(report) -> str``, ``write_svg(report, path)``
- ``html``            one self-contained HTML report (graph, tables, chart):
                      ``render_html(report) -> str``, ``write_html(report, path)``
- ``model_explorer``  per-node metrics in Google Model Explorer's node-data JSON format:
                      ``node_data(report, direction) -> dict``, ``write_node_data(report, path)``
- ``graphview``       what to draw: union of both graphs, module clusters, collapsing, folding
- ``scale``           error measures, node statuses and the colour scale they share
"""
