"""ainode: a DICOM node that brings AI results into the hospital's PACS.

The layers, from the bottom up (``tests/test_layers.py`` keeps them free of import cycles)::

    bottom    errors, conditions (rule language), uids, paths, instances, dicomio, settings
    storage   storage (keys, store, segments, spool, index, ledger, ingest, reports), audit
    edge      network (Storage SCP/SCU: the only pynetdicom user)
    stages    routing -> deid -> jobs (runner, stages, pipeline, scheduler, delivery) -> results
              (SEG/SR/GSPS/SC: the only highdicom user)
    roles     datadir, roles (the composition root), process (the one loop), receiver, app,
              console, cli

Algorithms are written against the plugin SDK (``ainode_sdk``, a distribution of its own in
``algorithms/``): they get volumes and return masks, codes and measurements, never DICOM or PHI.
"""
