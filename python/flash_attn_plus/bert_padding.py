"""FA2's flash_attn.bert_padding: moving between padded (batch, seqlen, ...) tensors and the packed
(total, ...) rows the varlen functions take. Same names, arguments and returns as FA2 2.8."""
import torch
import torch.nn.functional as F


class IndexFirstAxis(torch.autograd.Function):
    """input[indices] along the first axis; the gradient scatters back."""

    @staticmethod
    def forward(ctx, input, indices):
        ctx.save_for_backward(indices)
        ctx.first_axis_dim = input.shape[0]
        return input[indices]

    @staticmethod
    def backward(ctx, grad_output):
        (indices,) = ctx.saved_tensors
        grad_input = grad_output.new_zeros((ctx.first_axis_dim, *grad_output.shape[1:]))
        grad_input[indices] = grad_output
        return grad_input, None


class IndexPutFirstAxis(torch.autograd.Function):
    """A (first_axis_dim, ...) zero tensor with values written at indices; the gradient gathers."""

    @staticmethod
    def forward(ctx, values, indices, first_axis_dim):
        ctx.save_for_backward(indices)
        output = values.new_zeros((first_axis_dim, *values.shape[1:]))
        output[indices] = values
        return output

    @staticmethod
    def backward(ctx, grad_output):
        (indices,) = ctx.saved_tensors
        return grad_output[indices], None, None


class IndexFirstAxisResidual(torch.autograd.Function):
    """Like IndexFirstAxis, also returning the input itself so a residual branch can use it."""

    @staticmethod
    def forward(ctx, input, indices):
        ctx.save_for_backward(indices)
        return input[indices], input.detach()

    @staticmethod
    def backward(ctx, grad_output, grad_residual):
        (indices,) = ctx.saved_tensors
        grad_input = grad_residual.clone()
        grad_input.index_add_(0, indices, grad_output)
        return grad_input, None


index_first_axis = IndexFirstAxis.apply
index_put_first_axis = IndexPutFirstAxis.apply
index_first_axis_residual = IndexFirstAxisResidual.apply


def _cumulative(lengths):
    return F.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))


def unpad_input(hidden_states, attention_mask, unused_mask=None):
    """hidden_states (batch, seqlen, ...), attention_mask (batch, seqlen) (1 = real token). unused_mask marks
    tokens that are kept in the packed rows but not attended to (FA2 2.7+). Returns
    (hidden (total, ...), indices (total,) int64, cu_seqlens (batch + 1,) int32, max_seqlen_in_batch (int),
    used_seqlens_in_batch (batch,) int32)."""
    all_masks = attention_mask + unused_mask if unused_mask is not None else attention_mask
    seqlens_in_batch = all_masks.sum(dim=-1, dtype=torch.int32)
    used_seqlens_in_batch = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(all_masks.flatten(), as_tuple=False).flatten()
    max_seqlen_in_batch = int(seqlens_in_batch.max()) if seqlens_in_batch.numel() else 0
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return (index_first_axis(flat, indices), indices, _cumulative(seqlens_in_batch), max_seqlen_in_batch,
            used_seqlens_in_batch)


def unpad_input_for_concatenated_sequences(hidden_states, attention_mask_in_length):
    """Several sequences concatenated per row: attention_mask_in_length (batch, seqlen) lists each row's
    sequence lengths first, then zeros, e.g. [2, 3, 0, 0, 0, 0] for two sequences. Returns
    (hidden (total, ...), indices, cu_seqlens (one entry per sequence), max_seqlen_in_batch)."""
    length = attention_mask_in_length.sum(dim=-1)
    seqlen = attention_mask_in_length.shape[-1]
    mask = torch.arange(seqlen, device=length.device).expand(length.shape[0], seqlen) < length.unsqueeze(1)
    real_lengths = attention_mask_in_length[attention_mask_in_length > 0].flatten()
    indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
    max_seqlen_in_batch = int(real_lengths.max()) if real_lengths.numel() else 0
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return index_first_axis(flat, indices), indices, _cumulative(real_lengths), max_seqlen_in_batch


def pad_input(hidden_states, indices, batch, seqlen):
    """The inverse of unpad_input: (total, ...) -> (batch, seqlen, ...) with zeros at padding."""
    output = index_put_first_axis(hidden_states, indices, batch * seqlen)
    return output.view(batch, seqlen, *hidden_states.shape[1:])
