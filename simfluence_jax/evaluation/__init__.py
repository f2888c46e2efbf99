"""Part 6: questions and reports: counterfactual curricula (`counterfactuals`),
proponents / opponents (`attribution`), the data-efficiency study, the HTML/markdown report
(`reports`, `report_plots`). Imports any part below it.
"""
