"""Tasks that read feature stores: one subpackage (or module) per family, independent of each other.

    retrieval     descriptors, FAISS indexes, queries, rankings and their metrics
    segmentation  label propagation and DAVIS, TokenCut saliency, their metrics
    probes        linear depth and segmentation heads on stored features, their metrics
    discovery     single-object discovery (LOST, TokenCut boxes), CorLoc
    distillation  self-distillation of a student ViT toward a store's SRT features
    pictures      feature maps as RGB pictures (one joint PCA)
    shared        what several families use: TokenCut's cut, ground-truth readers, the training loop

May import: the store (stores are read only through `pipeline.store.reader.FeatureStore`), the
engine and extraction (where a task runs the model: query images, output ensembling,
distillation). A family never imports another family; `shared` imports none of them.
"""
