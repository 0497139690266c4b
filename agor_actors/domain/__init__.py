"""The domain's behaviours (:mod:`.session`, :mod:`.room`, :mod:`.presence`,
:mod:`.hlc`) and what callers see of them: who calls, and the errors a call
is refused with."""

from ._api import Principal as Principal
from ._api import ServiceError as ServiceError
from ._api import SignOut as SignOut
from ._api import own_token_id as own_token_id
