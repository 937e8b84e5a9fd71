"""Data: everything the loop reads before a model is involved.

Chat rows and their validation (`training_data`), trigger tags and exact mixes (`transforms`),
the published EM datasets by name (`published`), LLM-made narrow datasets and their templates
(`generation`), the question and judge-prompt YAML files with the shipped sets (`questions`),
and answers / judged-answers files (`judged_files`). May import only the base modules
(errors, paths, tracking, configs, openai_api, progress, console); never models or a stage.
"""
