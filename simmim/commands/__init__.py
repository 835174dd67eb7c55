"""The console commands that need SimMIM's config: ``swinv2-pretrain`` (``pretrain.main``) and ``swinv2-plan``
(``plan.main``). They run under the error guard of ``swinv2.commands``, as the fine-tuning commands do.

The planner's command lives here, not in ``swinv2.commands``, because it must know both config schemas (it
plans pretraining and fine-tuning configs alike), and ``simmim`` sits above ``swinv2``: the library never
imports its pretraining application.
"""
