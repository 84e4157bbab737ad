"""What every process needs at run time: user errors without tracebacks and progress bars (`cli`),
torch.distributed start-up (`distributed`), signals, the CPU memory layout and a stage clock."""
