"""Pure functional ops: losses, BatchNorm statistics, augmentation, image buffers."""
