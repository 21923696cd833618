"""Corpus-scale activations: ``introspect extract`` writes them, ``ActivationDataset`` reads them.

The pipeline has three stages, each in its own thread so the model never waits on text or on
the disk: a reader tokenizes the next shard's documents, the caller's thread runs the model
with a capture on padded batches, and a writer thread puts finished shards on disk. The two
queues between them are bounded, so memory is bounded by the queues (a few shards), never by
the corpus.

Folder format (read by :class:`introspect.ActivationDataset`, see :mod:`.dataset`):

- a shard holds a contiguous run of documents, is named after it
  (``shard-000000000-000000128.safetensors``) and describes itself in its header (the run's
  fingerprint, its documents, truncations); it appears under that name only once it is whole
  and on disk (written under a temporary name, ``fsync``-ed, renamed);
- ``progress.json`` holds the arguments of an unfinished extraction, to check a rerun against;
- ``manifest.json`` is written last, when every document is in a shard.

A rerun of the same command therefore resumes: the complete shards are found by name, the
documents they lack are extracted, the result is the one an uninterrupted run gives.

Distributed: under ``torchrun`` each rank takes a deterministic share of the remaining
documents (cut by size), writes its own shards, and rank 0 writes the manifest after a
``torch.distributed`` barrier. The shards, and so the batches, are those of a one-process run
(:mod:`.windows`): a rank's forward passes are one process's, and give the same values bit for
bit. The collectives carry no tensors (barriers only), so they run over gloo whatever device
the model is on.

One concern per module, imports going down the list only:

- :mod:`.run`: :func:`~.run.extract`, the arguments checked and the stages wired together;
- :mod:`.engine`: one rank's forward passes, a shard's rows gathered in document order;
- :mod:`.records`: the folder checked against a rerun (``progress.json``), what a rerun keeps,
  the manifest written last;
- :mod:`.settings`: what defines an extraction's content, its fingerprint, the weights';
- :mod:`.shards`: the complete shards on disk, the documents they lack, each rank's share;
- :mod:`.windows`: documents tokenized and cut into shards as one process cuts them;
- :mod:`.threads`: the reader running ahead and the shard writer, behind bounded queues;
- :mod:`.distributed`: the ranks: the world, barriers, joining and launching torchrun;
- :mod:`.files`: durable writes (fsync, atomic JSON) and clearing extract's own files;
- :mod:`.dataset`: the folder's format and :class:`~.dataset.ActivationDataset`, its reader;
- :mod:`.corpus`: the corpus, read and hashed once, fetched by runs of documents.

Nothing is imported here, so importing one module (the reader, say) loads only what it needs.
"""
